#!/usr/bin/env bash
# docs/cohort.md, "Measured": wall time of learnsim-test on the demo test pairs in one process (all cores' threads)
# and in two processes (trainer=ddp_sim: gloo, one thread each), interleaved, REPS times each; the demo's settings
# (+experiment=demo: 48^3, coarse-to-fine q_v) with the SSD baseline. Also checks that the two runs agree.
#   scripts/cohort_timing.sh [DATA (default demo_data)] [OUT (default runs/cohort_timing)] [REPS (default 2)]
set -euo pipefail
DATA="${1:-demo_data}" OUT="${2:-runs/cohort_timing}" REPS="${3:-2}"
mkdir -p "$OUT"
ARGS=(+experiment=demo metric=ssd "paths.data_dir=$DATA" save_nifti=false logger=none device=cpu name=cohort_timing)
for rep in $(seq "$REPS"); do
  for mode in one two; do
    run="$OUT/${mode}_$rep"
    rm -rf "$run"
    extra=()
    [ "$mode" = two ] && extra=(trainer=ddp_sim)
    t0=$(date +%s.%N)
    learnsim-test "${ARGS[@]}" "${extra[@]}" "hydra.run.dir=$run" > "$run.log" 2>&1
    echo "$mode rep $rep: $(echo "$(date +%s.%N) - $t0" | bc) s (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/times.txt"
  done
done
python - "$OUT" <<'PY'
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
timing = ["seconds", "fit_seconds", "eval_seconds"]
one, two = (pd.read_csv(out / f"{m}_1" / "per_pair.csv").drop(columns=timing, errors="ignore") for m in ("one", "two"))
same = one.equals(two)
diff = (one.select_dtypes("number") - two.select_dtypes("number")).abs().max().max()
print(f"per_pair.csv of one and two processes: {'identical' if same else f'max abs difference {diff:.3g}'} "
      "(equal only with equal threads per process)")
PY
