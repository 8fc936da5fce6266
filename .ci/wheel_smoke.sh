#!/usr/bin/env bash
# CI, before the test suite: build the sdist and the wheel, check them (twine), install the wheel alone into a fresh
# virtual environment outside the source tree, and from an empty folder run every CLI's --help and --version, a tiny
# demo cohort (16^3), one training batch, one test pair and one learnsim-register (README, "Quick start").
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" "$SRC/build"' EXIT
echo "== wheel smoke test in $WORK"
python -m pip install -q build twine
python -m build --sdist --wheel -o "$WORK/dist" "$SRC" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
python -m twine check "$WORK/dist"/*
python -m zipfile -l "$WORK"/dist/learnsim-*.whl | grep -q "learnsim/conf/train.yaml"
python -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q torch==2.13.0 "$WORK"/dist/learnsim-*.whl
mkdir "$WORK/empty"
cd "$WORK/empty"
export PATH="$WORK/venv/bin:$PATH" WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
python -c 'from learnsim.cli.config import config_dir; import learnsim; print("configs:", config_dir(), learnsim.__version__)'
for cmd in learnsim-train learnsim-test learnsim-register learnsim-data learnsim-compare; do
  "$cmd" --help > /dev/null
  "$cmd" --version
done
tiny=(paths.data_dir=cohort "data.dims=[16,16,16]" "q_v.level_iters=[2,2,2]")
learnsim-data demo --dims 16 --n-train 1 --n-val 1 --n-test 1 --out cohort > /dev/null
learnsim-train +experiment=demo "${tiny[@]}" trainer.max_epochs=1 +trainer.limit_train_batches=1 logger=csv \
  hydra.run.dir=train > train.log 2>&1 || { tail -20 train.log; exit 1; }
learnsim-test +experiment=demo ckpt=train/checkpoints/last.ckpt "${tiny[@]}" max_pairs=1 save_nifti=false \
  figures=false logger=none hydra.run.dir=test 2>&1 | tail -1
pair=$(python -c 'import csv; r = next(csv.DictReader(open("cohort/test.csv"))); print(r["fixed"], r["moving"])')
set -- $pair
learnsim-register "cohort/$1" "cohort/$2" --out reg --no-figures no_samples=2 level_iters=2,2,2 | tail -1
echo "== wheel smoke test passed"
