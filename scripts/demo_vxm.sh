#!/usr/bin/env bash
# VoxelMorph on the demo cohort (after scripts/demo.sh), on CPU at 64^3: trained with the baseline SSD, the baseline
# LCC and the frozen learnt SSD metric of the demo run (+experiment=vxm_demo_ssd / vxm_demo_lcc /
# vxm_demo_learnt_ssd), each on training pairs generated on the fly (a fresh seeded pseudo-subject of a training
# subject per item: learnsim.data.synthetic_pairs), validation DSC every epoch, the best checkpoint kept
# (checkpoints/best.ckpt), 14 minutes at most per run. Then every run, VoxelMorph and q_v (SSD, LCC, learnt SSD, fitted
# per test pair on the same 64^3 grid), is evaluated on the 4 test pairs and compared in one table; the learnt-metric
# VoxelMorph is tested against its baseline (paired Wilcoxon, runs/demo/compare_vxm/wilcoxon.csv).
#   VXM_RUNS="ssd lcc learnt_ssd"  which VoxelMorph runs to train (default: all three)
#   VXM_QV=0                       skip the q_v evaluations at 64^3 (their rows are then left out)
# Threads: OMP_NUM_THREADS (default 1: the 2-core CI machine is shared); each run uses one data worker.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
RUNS="${VXM_RUNS:-ssd lcc learnt_ssd}"
QV="${VXM_QV:-1}"
TEST_ITERS="${LEARNSIM_DEMO_TEST_ITERS:-96}"
METRIC_CKPT="$OUT/train_learnt_ssd/checkpoints/last.ckpt"
[ -f "$METRIC_CKPT" ] || { echo "run scripts/demo.sh first (no $METRIC_CKPT)"; exit 1; }
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
grid=(paths.data_dir="$DATA" data.dims=[64,64,64])

for name in $RUNS; do
  extra=()
  [ "$name" = learnt_ssd ] && extra=(metric_ckpt="$METRIC_CKPT")
  rm -rf "$OUT/train_vxm_$name" "$OUT/test_vxm_$name"
  t0=$(date +%s)
  learnsim-train +experiment="vxm_demo_$name" "${extra[@]}" "${grid[@]}" logger=csv hydra.run.dir="$OUT/train_vxm_$name"
  echo "vxm_$name: trained in $(( $(date +%s) - t0 )) s"
  learnsim-test +experiment="vxm_demo_$name" "${extra[@]}" ckpt="$OUT/train_vxm_$name/checkpoints/best.ckpt" \
    name="vxm_$name" "${grid[@]}" logger=none hydra.run.dir="$OUT/test_vxm_$name"
done

qv_runs=()
if [ "$QV" = 1 ]; then
  # q_v fitted per test pair on the same 64^3 grid as VoxelMorph (scripts/demo.sh's own runs are at 48^3)
  common=("${grid[@]}" q_v.no_iters="$TEST_ITERS" no_samples_uncertainty=20 logger=none)
  for run in "ssd_baseline metric=ssd +experiment=demo" "lcc_baseline metric=lcc +experiment=demo_lcc" \
             "learnt_ssd ckpt=$METRIC_CKPT +experiment=demo"; do
    set -- $run
    name=$1; shift
    rm -rf "$OUT/test64_$name"
    learnsim-test "$@" name="$name" "${common[@]}" hydra.run.dir="$OUT/test64_$name"
    qv_runs+=("$OUT/test64_$name")
  done
fi

vxm_runs=()
for name in $RUNS; do vxm_runs+=("$OUT/test_vxm_$name"); done
learnsim-compare --table --per-pair "${vxm_runs[@]}" "${qv_runs[@]}"
if [ -d "$OUT/test_vxm_ssd" ] && [ -d "$OUT/test_vxm_learnt_ssd" ]; then
  # the learnt metric against its baseline (the first run is the reference of the paired Wilcoxon tests)
  learnsim-compare "$OUT/test_vxm_ssd" "$OUT/test_vxm_learnt_ssd" --labels VXM_SSD VXM_learnt_SSD --out "$OUT/compare_vxm"
fi
