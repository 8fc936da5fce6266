#!/usr/bin/env bash
# The main job on the built-in real-MRI demo data, on CPU (README, "The CPU demo"):
#   1. build the demo cohort (real brain MRI from pinned PyPI packages; not UK Biobank): 12 training, 4 validation
#      and 16 test pairs (the test and validation subjects from a labelled source the training ones never use),
#   2. learn two similarity metrics, initialised to SSD (+experiment=demo) and to LCC (+experiment=demo_lcc),
#   3. evaluate the SSD and LCC baselines and both learnt metrics (best validation-DSC checkpoints) on the test
#      pairs, with the same q_v schedule (coarse-to-fine, fast integration, 48^3),
#   4. compare each learnt metric with its baseline (table, paired Wilcoxon tests over the pairs, box plots) and
#      draw what the metrics learnt (compare/learnt_metric.png).
# Everything lands in runs/demo/. Sizes are chosen for 2 CPU cores (under 25 minutes): see conf/experiment/demo.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
mkdir -p "$OUT"
t0=$(date +%s)

echo "== 1/4 demo cohort -> $DATA"
learnsim-data demo --dims 64 --n-train 12 --n-val 4 --n-test 16 --out "$DATA"
t1=$(date +%s)

echo "== 2/4 learn the metrics (CNN_SSD and CNN_LCC, Dirac-initialised to SSD and LCC)"
for run in "learnt_ssd demo" "learnt_lcc demo_lcc"; do
  set -- $run
  rm -rf "$OUT/train_$1"
  learnsim-train +experiment="$2" paths.data_dir="$DATA" hydra.run.dir="$OUT/train_$1" logger=csv \
    ${LEARNSIM_DEMO_TRAIN_ARGS:-}
done
t2=$(date +%s)

echo "== 3/4 evaluate on the test pairs (q_v from scratch, coarse-to-fine, frozen metric)"
common=(paths.data_dir="$DATA" save_nifti=false)
for run in "ssd_baseline metric=ssd +experiment=demo" "lcc_baseline metric=lcc +experiment=demo_lcc" \
           "learnt_ssd ckpt=$OUT/train_learnt_ssd/checkpoints/best.ckpt +experiment=demo" \
           "learnt_lcc ckpt=$OUT/train_learnt_lcc/checkpoints/best.ckpt +experiment=demo_lcc"; do
  set -- $run
  name=$1; shift
  rm -rf "$OUT/test_$name"
  learnsim-test "$@" name="$name" "${common[@]}" hydra.run.dir="$OUT/test_$name"
done
t3=$(date +%s)

echo "== 4/4 compare"
learnsim-compare "$OUT/test_ssd_baseline" "$OUT/test_learnt_ssd" --labels SSD learnt_SSD --out "$OUT/compare_ssd"
learnsim-compare "$OUT/test_lcc_baseline" "$OUT/test_learnt_lcc" --labels LCC learnt_LCC --out "$OUT/compare_lcc"
learnsim-compare --table --per-pair "$OUT/test_ssd_baseline" "$OUT/test_learnt_ssd" "$OUT/test_lcc_baseline" \
  "$OUT/test_learnt_lcc"
"${PYTHON:-python}" -c 'import sys; from learnsim.evaluation.figures import metric_figure_from_data as f
print(f(sys.argv[1], {"SSD": "ssd:100", "learnt SSD": sys.argv[2], "LCC": "lcc:10", "learnt LCC": sys.argv[3]},
        sys.argv[4], dims=48))' "$DATA" "$OUT/train_learnt_ssd/checkpoints/best.ckpt" \
  "$OUT/train_learnt_lcc/checkpoints/best.ckpt" "$OUT/learnt_metric.png"
t4=$(date +%s)
echo "demo done in $((t4 - t0)) s: cohort $((t1 - t0)) s, training $((t2 - t1)) s, evaluation $((t3 - t2)) s," \
  "comparison $((t4 - t3)) s; results in $OUT/"
