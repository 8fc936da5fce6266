# Sourced by the measurement scripts (precision_sweep.sh, paper_setting.sh): wandb offline and silent, one thread per
# process unless set (two single-threaded processes beat one two-threaded one on 2 cores; docs/results.md, "The CPU demo").
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  NUMBA_NUM_THREADS="${NUMBA_NUM_THREADS:-1}"
mkdir -p "$OUT"   # the caller sets OUT, the results folder
t0=$(date +%s)
