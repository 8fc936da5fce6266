"""Time the whole ``learnsim-register`` command on a cohort's test pairs: seconds, DSC before/after, folding voxels.

    python scripts/register_timing.py --data /tmp/demo128 --out /tmp/timing --repeats 3 \
        --variant new --variant "old_schedule:level_iters=200,100,50" \
        --variant today --env "today:PYTHONPATH=/path/to/older/learnsim/src"

Each run is one process (``python -m learnsim.cli.register``: loading, histogram matching, the fit, the samples,
the NIfTI maps, the figures and the summary, as a user runs it), timed from start to exit. The variants alternate
within each pair and repeat (``--repeats``), so a machine that gets busier slows them alike; the table gives each
variant's min / median / max seconds per pair over all runs, the median over pairs of each pair's median, mean DSC
after registration (from each run's ``registration.json``: mean over the atlas' labels, on the fixed grid; and
``dsc_sub_*``: learnsim-test's, the mean over the evaluated structures, ``learnsim.evaluation.metrics.STRUCTURES``) and the folding voxels (det J <= 0 of the mean transformation). A variant is ``NAME[:key=value key=value ...]`` (overrides
of learnsim-register); ``--env NAME:KEY=VALUE`` sets an environment variable for that variant's runs only (e.g.
``PYTHONPATH`` of an older learnsim, to time it against this one). Writes ``runs.csv`` and ``summary.csv`` in
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _variants(specs: list[str], envs: list[str]) -> list[tuple[str, list[str], dict[str, str]]]:
    out = []
    extra: dict[str, dict[str, str]] = {}
    for item in envs:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if not key:
            raise SystemExit(f"--env {item!r}: expected NAME:KEY=VALUE")
        extra.setdefault(name, {})[key] = value
    for spec in specs or ["default"]:
        name, _, rest = spec.partition(":")
        out.append((name, rest.split(), extra.get(name, {})))
    unknown = set(extra) - {n for n, _, _ in out}
    if unknown:
        raise SystemExit(f"--env names variants that do not exist: {sorted(unknown)}")
    return out


def _run_once(root: Path, row: dict, args: list[str], env: dict[str, str], out: Path) -> dict:
    """One whole command; its wall time (s) and the numbers of its ``registration.json``."""
    cmd = [sys.executable, "-m", "learnsim.cli.register", str(root / row["fixed"]), str(root / row["moving"]),
           "--out", str(out), "--seg", str(root / row["moving_seg"]), "--fixed-seg", str(root / row["fixed_seg"])]
    if row.get("fixed_mask"):
        cmd += ["--fixed-mask", str(root / row["fixed_mask"])]
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    done = subprocess.run(cmd + args, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"learnsim-register failed ({' '.join(cmd + args)}):\n{done.stderr[-2000:]}")
    info = json.loads((out / "registration.json").read_text())
    before, after = _subcortical_dsc(root, row, out)
    return {"seconds": round(seconds, 2), "dsc_before": info.get("dsc_before"), "dsc_after": info.get("dsc_after"),
            "dsc_sub_before": before, "dsc_sub_after": after,
            "folding_voxels": info.get("folding_voxels"), "fit_seconds": round(float(info.get("fit_seconds", 0)), 2)}


def _subcortical_dsc(root: Path, row: dict, out: Path) -> tuple[float, float]:
    """learnsim-test's DSC (mean over the evaluated structures, ``learnsim.evaluation.metrics.STRUCTURES``) before
    and after, from the moving and the warped segmentation on the fixed grid (the demo's subjects share it)."""
    import nibabel as nib
    import numpy as np
    import torch

    from learnsim.evaluation.metrics import STRUCTURES, structure_metrics

    fixed = np.asarray(nib.load(root / row["fixed_seg"]).dataobj).astype(np.int64)
    moving = np.asarray(nib.load(root / row["moving_seg"]).dataobj).astype(np.int64)
    warped = np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj).astype(np.int64)
    if not fixed.shape == moving.shape == warped.shape:
        return float("nan"), float("nan")
    labels = [k for k in STRUCTURES if (moving == k).any()]

    def mean(pred: np.ndarray) -> float:
        res = structure_metrics(torch.from_numpy(pred), torch.from_numpy(fixed), labels, (1.0, 1.0, 1.0), surface=False)
        vals = [r["dsc"] for r in res.values() if r["dsc"] == r["dsc"]]
        return round(float(np.mean(vals)), 4)

    return mean(moving), mean(warped)


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        pairs = list(dict.fromkeys(r["pair"] for r in mine))
        per_pair = {p: [r for r in mine if r["pair"] == p] for p in pairs}
        secs = [r["seconds"] for r in mine]
        rows.append({
            "variant": name, "pairs": len(pairs), "runs": len(mine),
            "s_min": min(secs), "s_median": statistics.median(secs), "s_max": max(secs),
            "s_median_of_pair_medians": statistics.median(statistics.median(r["seconds"] for r in rs)
                                                          for rs in per_pair.values()),
            "dsc_before": round(statistics.mean(float(rs[0]["dsc_before"]) for rs in per_pair.values()), 4),
            "dsc_after": round(statistics.mean(float(r["dsc_after"]) for r in mine), 4),
            "dsc_sub_before": round(statistics.mean(float(rs[0]["dsc_sub_before"]) for rs in per_pair.values()), 4),
            "dsc_sub_after": round(statistics.mean(float(r["dsc_sub_after"]) for r in mine), 4),
            "dsc_after_per_pair": " / ".join(f"{statistics.mean(float(r['dsc_after']) for r in rs):.3f}"
                                            for rs in per_pair.values()),
            "folding_voxels": sum(int(r["folding_voxels"]) for r in mine),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cohort folder with test.csv (learnsim-data demo)")
    ap.add_argument("--out", required=True, help="folder for runs.csv, summary.csv and the last outputs")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:key=value ...] (default: 'default')")
    ap.add_argument("--env", action="append", default=[], help="NAME:KEY=VALUE for one variant's runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    args = ap.parse_args()
    root, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(root / "test.csv")))[: args.pairs]
    variants = _variants(args.variant, args.env)
    runs: list[dict] = []
    total, t0 = len(rows) * args.repeats * len(variants), time.perf_counter()
    for rep in range(args.repeats):
        for row in rows:
            pair = Path(row["moving"]).parent.name
            for name, overrides, env in variants:
                r = _run_once(root, row, overrides, env, out / f"last_{name}")
                runs.append({"variant": name, "pair": pair, "repeat": rep, **r})
                left = (time.perf_counter() - t0) / len(runs) * (total - len(runs))
                print(f"[{len(runs)}/{total}, ~{left / 60:.0f} min left] {name} {pair} #{rep}: {r['seconds']:.1f} s, "
                      f"DSC {r['dsc_before']:.3f} -> {r['dsc_after']:.3f}, {r['folding_voxels']} folding", flush=True)
    for fname, table in (("runs.csv", runs), ("summary.csv", _summary(runs))):
        with open(out / fname, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    for row in _summary(runs):
        print(", ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
