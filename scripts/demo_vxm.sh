#!/usr/bin/env bash
# VoxelMorph on the demo cohort (after scripts/demo.sh), on CPU at 64^3 (docs/voxelmorph.md):
#   1. train four networks, one after the other, each on training pairs generated on the fly (a fresh seeded
#      pseudo-subject per step: learnsim.data.synthetic_pairs), validation DSC every epoch, the best checkpoint
#      kept (checkpoints/best.ckpt), 14 minutes each: baseline SSD, baseline LCC (9^3 window), the frozen learnt SSD
#      and the frozen learnt LCC metrics of the demo run (+experiment=vxm_demo_ssd / vxm_demo_lcc /
#      vxm_demo_learnt_ssd / vxm_demo_learnt_lcc);
#   2. evaluate each best checkpoint on the 16 test pairs: the network alone, and the network followed by
#      VXM_REFINE_ITERS Adam steps of instance optimisation on its own energy (lr VXM_REFINE_LR; chosen on the
#      validation pairs, docs/voxelmorph.md);
#   3. fit q_v with the SSD and LCC baselines on the same test pairs and the same 64^3 grid (the instance-optimisation
#      reference; scripts/demo.sh's own q_v runs are at 48^3), the two side by side, one thread each;
#   4. print one table (learnsim-compare --table --per-pair) and test each learnt-metric network against its
#      baseline (paired Wilcoxon: runs/demo/compare_vxm_ssd/, compare_vxm_lcc/).
#   VXM_RUNS="ssd lcc learnt_ssd learnt_lcc"  which networks to train (default: all four)
#   VXM_QV=0                                  skip step 3
#   VXM_REFINE_ITERS=0                        skip the refined evaluations of step 2
# Threads: OMP_NUM_THREADS (default 2) for training; each run uses one more process generating the pairs.
# About 65 minutes on a quiet 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
RUNS="${VXM_RUNS:-ssd lcc learnt_ssd learnt_lcc}"
QV="${VXM_QV:-1}"
REFINE_ITERS="${VXM_REFINE_ITERS:-10}" REFINE_LR="${VXM_REFINE_LR:-0.1}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
grid=(paths.data_dir="$DATA" data.dims=[64,64,64])

metric_ckpt() {  # the demo's learnt metric of a vxm run name (learnt_ssd -> runs/demo/train_learnt_ssd/...)
  local ckpt="$OUT/train_$1/checkpoints/best.ckpt"
  [ -f "$ckpt" ] || { echo "run scripts/demo.sh first (no $ckpt)" >&2; return 1; }
  echo "$ckpt"
}

for name in $RUNS; do
  extra=()
  case "$name" in learnt_*) extra=(metric_ckpt="$(metric_ckpt "$name")") ;; esac
  rm -rf "$OUT/train_vxm_$name" "$OUT/test_vxm_$name" "$OUT/test_vxm_${name}_refined"
  t0=$(date +%s)
  learnsim-train +experiment="vxm_demo_$name" "${extra[@]}" "${grid[@]}" logger=csv hydra.run.dir="$OUT/train_vxm_$name"
  echo "vxm_$name: trained in $(( $(date +%s) - t0 )) s"
  test_args=(+experiment="vxm_demo_$name" "${extra[@]}" ckpt="$OUT/train_vxm_$name/checkpoints/best.ckpt" "${grid[@]}"
             logger=none save_nifti=false)
  learnsim-test "${test_args[@]}" name="vxm_$name" hydra.run.dir="$OUT/test_vxm_$name"
  if [ "$REFINE_ITERS" -gt 0 ]; then  # the same network, each prediction refined by instance optimisation
    learnsim-test "${test_args[@]}" name="vxm_${name}_refined" instance_optimisation_iters="$REFINE_ITERS" \
      instance_lr="$REFINE_LR" hydra.run.dir="$OUT/test_vxm_${name}_refined"
  fi
done

qv_runs=()
if [ "$QV" = 1 ]; then
  # q_v fitted per test pair on the same 64^3 grid as VoxelMorph: the demo's schedule (coarse-to-fine, fast mode)
  qv() {  # qv NAME ARGS...
    local name=$1; shift
    rm -rf "$OUT/test64_$name"
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 learnsim-test "$@" name="$name" "${grid[@]}" no_samples_uncertainty=5 \
      logger=none save_nifti=false hydra.run.dir="$OUT/test64_$name" > "$OUT/test64_$name.log" 2>&1
  }
  qv ssd_baseline +experiment=demo metric=ssd & p1=$!
  qv lcc_baseline +experiment=demo_lcc metric=lcc & p2=$!
  wait "$p1" || { echo "q_v SSD failed: $OUT/test64_ssd_baseline.log" >&2; exit 1; }
  wait "$p2" || { echo "q_v LCC failed: $OUT/test64_lcc_baseline.log" >&2; exit 1; }
  qv_runs=("$OUT/test64_ssd_baseline" "$OUT/test64_lcc_baseline")
fi

vxm_runs=()
for name in $RUNS; do vxm_runs+=("$OUT/test_vxm_$name"); done
if [ "$REFINE_ITERS" -gt 0 ]; then for name in $RUNS; do vxm_runs+=("$OUT/test_vxm_${name}_refined"); done; fi
learnsim-compare --table --per-pair "${vxm_runs[@]}" "${qv_runs[@]}"
for kind in ssd lcc; do
  for how in "" _refined; do
    if [ -d "$OUT/test_vxm_$kind$how" ] && [ -d "$OUT/test_vxm_learnt_$kind$how" ]; then
      # the learnt metric against its baseline (the first run is the reference of the paired Wilcoxon tests)
      label=$(echo "$kind" | tr a-z A-Z)
      learnsim-compare "$OUT/test_vxm_$kind$how" "$OUT/test_vxm_learnt_$kind$how" --labels "VXM_$label$how" \
        "VXM_learnt_$label$how" --out "$OUT/compare_vxm_$kind$how"
    fi
  done
done
