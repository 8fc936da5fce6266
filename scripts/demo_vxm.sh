#!/usr/bin/env bash
# VoxelMorph on the demo cohort (after scripts/demo.sh): trained with the baseline SSD and with the frozen learnt
# SSD metric of the demo run, evaluated like the q_v runs, compared with them. CPU sizes: 48^3, 6 squarings,
# VXM_EPOCHS epochs (default 40, ~36 steps of 4 pairs... far from a converged VoxelMorph); the baseline SSD with the
# demo's likelihood precision (metric.energy.weight=100, as +experiment=demo; the learnt metric carries its own).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
EPOCHS="${VXM_EPOCHS:-40}"
METRIC_CKPT="$OUT/train_learnt_ssd/checkpoints/last.ckpt"
[ -f "$METRIC_CKPT" ] || { echo "run scripts/demo.sh first (no $METRIC_CKPT)"; exit 1; }
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
small=(paths.data_dir="$DATA" data.dims=[48,48,48] data.intensity=histmatch data.batch_size=4 data.num_workers=0 trainer=cpu transformation.no_steps=6
       model.lr=1e-3 trainer.max_epochs="$EPOCHS")
for run in "vxm_ssd +experiment=vxm_ssd metric.energy.weight=100" "vxm_learnt_ssd +experiment=vxm_learnt_ssd metric_ckpt=$METRIC_CKPT"; do
  set -- $run
  name=$1; shift
  rm -rf "$OUT/train_$name" "$OUT/test_$name"
  learnsim-train "$@" "${small[@]}" hydra.run.dir="$OUT/train_$name"
  learnsim-test +experiment=vxm_ssd ckpt="$OUT/train_$name/checkpoints/last.ckpt" name="$name" \
    paths.data_dir="$DATA" data.dims=[48,48,48] data.intensity=histmatch data.num_workers=0 transformation.no_steps=6 hydra.run.dir="$OUT/test_$name"
done
python scripts/compare_runs.py "$OUT/test_vxm_ssd" "$OUT/test_vxm_learnt_ssd" "$OUT/test_ssd_baseline" \
  "$OUT/test_learnt_ssd" --labels VXM_SSD VXM_learnt_SSD SSD learnt_SSD --out "$OUT/compare_vxm"
python scripts/demo_table.py --per-pair "$OUT/test_ssd_baseline" "$OUT/test_learnt_ssd" "$OUT/test_vxm_ssd" "$OUT/test_vxm_learnt_ssd"
