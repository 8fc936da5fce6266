#!/usr/bin/env bash
# Three-volume vs larger training cohort (issue 24; docs/data.md, "More real people in the training cohort"):
#   1. build both demo cohorts at 64^3 (same seed): `--train-sources three` (12 training subjects from the three
#      volumes of earlier versions) and the default `all` (20 training subjects, 2 from each of 10 volumes); the
#      validation and test subjects are the same files in both (checked here: sha256 of test.csv, val.csv, atlas and
#      every val/test subject);
#   2. the learnt likelihood (+experiment=demo_vb: SSD's precision learnt by VB over 8 training pairs) trained on each
#      cohort (the two side by side, one thread each) and evaluated on the 16 test pairs;
#   3. the VoxelMorph LCC network (+experiment=vxm_demo_lcc, VXM_MINUTES minutes each, default 14) trained on each
#      cohort, one after the other, and evaluated on the 16 test pairs;
#   4. the ten-volume network again, stopped at the step count the three-volume one reached in its minutes (the
#      same wall clock gives different step counts on a shared machine);
#   5. paired Wilcoxon tests over the test pairs (learnsim-compare) into $OUT/compare_{vb,vxm_lcc,vxm_lcc_steps}.
# Every heavy step runs under `flock $LOCK` (shared 2-core machine). Everything lands in $OUT (logs: $OUT/*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_COHORT_OUT:-runs/cohort24}"
DATA="${LEARNSIM_COHORT_DATA:-$OUT/data}"
LOCK="${LEARNSIM_LOCK:-/tmp/learnsim_heavy.lock}"
MIN="${VXM_MINUTES:-14}"
STEPS="${COHORT_STEPS:-vb vxm vxm_matched}"  # which training comparisons to (re)run; the other's results are reused
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
mkdir -p "$OUT"

t0=$(date +%s)
learnsim-data demo --dims 64 --n-train 20 --n-val 4 --n-test 16 --out "$DATA/all" > "$OUT/build_all.log" 2>&1
echo "cohort 'all' built in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
learnsim-data demo --dims 64 --n-train 12 --n-val 4 --n-test 16 --train-sources three --out "$DATA/three" \
  > "$OUT/build_three.log" 2>&1
echo "cohort 'three' built in $(( $(date +%s) - t0 )) s"
same() { (cd "$1" && sha256sum test.csv val.csv atlas/* subjects/test-*/* subjects/val-*/*); }
diff <(same "$DATA/all") <(same "$DATA/three") > /dev/null || { echo "the test/val files differ between cohorts" >&2; exit 1; }
echo "test and validation pairs: the same files in both cohorts"

vb() {  # vb COHORT: learn SSD's precision over the training pairs, evaluate on the test pairs
  local c=$1
  rm -rf "$OUT/train_vb_$c" "$OUT/test_vb_$c"
  OMP_NUM_THREADS=1 learnsim-train +experiment=demo_vb paths.data_dir="$DATA/$c" logger=csv \
    hydra.run.dir="$OUT/train_vb_$c"
  OMP_NUM_THREADS=1 learnsim-test +experiment=demo_vb ckpt="$OUT/train_vb_$c/checkpoints/last.ckpt" \
    paths.data_dir="$DATA/$c" save_nifti=false name="vb_$c" hydra.run.dir="$OUT/test_vb_$c"
}
vxm() {  # vxm COHORT [TAG TRAINER_ARGS...]: train the VoxelMorph LCC network, evaluate its best checkpoint
  local c=$1 tag=${2:-} grid=(paths.data_dir="$DATA/$1" data.dims=[64,64,64])
  shift; shift || true
  rm -rf "$OUT/train_vxm_lcc_$c$tag" "$OUT/test_vxm_lcc_$c$tag"
  OMP_NUM_THREADS=2 learnsim-train +experiment=vxm_demo_lcc "${grid[@]}" trainer.max_time="00:00:$MIN:00" "$@" \
    logger=csv hydra.run.dir="$OUT/train_vxm_lcc_$c$tag"
  OMP_NUM_THREADS=2 learnsim-test +experiment=vxm_demo_lcc ckpt="$OUT/train_vxm_lcc_$c$tag/checkpoints/best.ckpt" \
    "${grid[@]}" logger=none save_nifti=false name="vxm_lcc_$c$tag" hydra.run.dir="$OUT/test_vxm_lcc_$c$tag"
}
export -f vb vxm
export OUT DATA MIN

if [[ " $STEPS " == *" vb "* ]]; then
  t0=$(date +%s)
  flock "$LOCK" bash -c 'vb three > "$OUT/vb_three.log" 2>&1 & p=$!; vb all > "$OUT/vb_all.log" 2>&1; wait $p'
  echo "learnt likelihood: both cohorts in $(( $(date +%s) - t0 )) s (waiting for the lock included)"
fi
if [[ " $STEPS " == *" vxm "* ]]; then  # both networks under one hold of the lock: the same machine load for both
  t0=$(date +%s)
  flock "$LOCK" bash -c 'for c in three all; do s=$(date +%s); vxm $c > "$OUT/vxm_$c.log" 2>&1;
    echo "VoxelMorph LCC on $c: $(( $(date +%s) - s )) s"; done'
  echo "VoxelMorph LCC: both cohorts in $(( $(date +%s) - t0 )) s (waiting for the lock included)"
fi

if [[ " $STEPS " == *" vxm_matched "* ]]; then
  # the same wall clock gave the two networks different step counts on a shared machine: train the ten-volume one
  # again, stopped at the step count the three-volume one reached
  n=$(python -c "import csv, glob, sys; f = glob.glob(sys.argv[1] + '/csv/*/metrics.csv')[0]
print(max(int(r['step']) for r in csv.DictReader(open(f))) + 1)" "$OUT/train_vxm_lcc_three")
  MIN=$((MIN + 2)) flock "$LOCK" bash -c "vxm all _steps trainer.max_steps=$n" > "$OUT/vxm_all_steps.log" 2>&1
  echo "VoxelMorph LCC on all, stopped at $n steps: done"
  learnsim-compare "$OUT/test_vxm_lcc_three" "$OUT/test_vxm_lcc_all_steps" --labels VXM_LCC_three \
    VXM_LCC_all_same_steps --out "$OUT/compare_vxm_lcc_steps"
fi

learnsim-compare "$OUT/test_vb_three" "$OUT/test_vb_all" --labels VB_three VB_all --out "$OUT/compare_vb"
learnsim-compare "$OUT/test_vxm_lcc_three" "$OUT/test_vxm_lcc_all" --labels VXM_LCC_three VXM_LCC_all \
  --out "$OUT/compare_vxm_lcc"
learnsim-compare --table --per-pair "$OUT/test_vb_three" "$OUT/test_vb_all" "$OUT/test_vxm_lcc_three" \
  "$OUT/test_vxm_lcc_all"
