#!/usr/bin/env bash
# The likelihood precision swept on the demo's test pairs (docs/results.md, "Is the learnt metric's gain a scale effect?"):
# SSD at 1, 10, 100, 1000, 3000, 10000 and LCC at 1, 3, 10, 30, 100 with the demo's q_v schedule, plus each
# baseline with its precision learnt per pair (likelihood=auto, from precision 1). Then one figure: mean DSC,
# folding and SDlogJ against precision, with any learnt metric placed at its effective precision (its weight x
# its energy ratio rho, from its own learnsim-test run given as LEARNT_RUNS="name=run_dir ...").
# Usage: bash scripts/precision_sweep.sh [DATA] [OUT]   (after learnsim-data demo --dims 64 ... --out DATA)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-demo_data}"
OUT="${2:-runs/sweep}"
. scripts/common.sh   # environment, mkdir OUT, t0
one() {  # one NAME EXPERIMENT ARGS...: a learnsim-test run into $OUT/NAME (skipped when already done)
  local name=$1 exp=$2
  shift 2
  [ -f "$OUT/$name/summary.json" ] && return 0
  echo "== $name"
  learnsim-test +experiment="$exp" "$@" name="$name" paths.data_dir="$DATA" save_nifti=false figures=false \
    logger=none hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
ssd() { for w in ${SSD_PRECISIONS:-1 10 100 1000 3000 10000}; do one "ssd_w$w" demo metric=ssd metric.energy.weight="$w"; done
        one ssd_auto demo metric=ssd metric.energy.weight=1 likelihood=auto; }
lcc() { for w in ${LCC_PRECISIONS:-1 3 10 30 100}; do one "lcc_w$w" demo_lcc metric=lcc metric.energy.weight="$w"; done
        one lcc_auto demo_lcc metric=lcc metric.energy.weight=1 likelihood=auto; }
ssd > "$OUT/ssd_chain.log" 2>&1 &
a=$!
lcc > "$OUT/lcc_chain.log" 2>&1 &
b=$!
wait "$a" && wait "$b"
"${PYTHON:-python}" scripts/precision_figure.py "$OUT" ${LEARNT_RUNS:-}
echo "sweep done in $(( $(date +%s) - t0 )) s: $OUT/precision_sweep.png, $OUT/precision_sweep.csv"
