#!/usr/bin/env python
"""Print the README's demo table: mean DSC / ASD / HD95 over pairs x samples x structures, the posterior-mean
DSC, folding, SDlogJ, uncertainty and registration time per run folder (written by learnsim-test), after a
"before registration" row (the identity: affine-only). ``--per-pair`` adds the mean DSC per pair and run."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def row(run: Path) -> dict:
    m = pd.read_csv(run / "metrics.csv")
    mean = pd.read_csv(run / "metrics_mean.csv") if (run / "metrics_mean.csv").is_file() else None
    pp = pd.read_csv(run / "per_pair.csv")
    return {
        "run": run.name.removeprefix("test_"),
        "DSC (samples)": f"{m.dsc.mean():.3f} ± {m.groupby('pair').dsc.mean().std():.3f}",
        "DSC (mean transf.)": f"{mean.dsc.mean():.3f}" if mean is not None else "n/a",
        "ASD mm": f"{m.asd_mm.mean():.2f}",
        "HD95 mm": f"{m.hd95_mm.mean():.2f}",
        "folding voxels": int(pp.folding_voxels.sum()),
        "SDlogJ": f"{pp.sdlogj.mean():.3f}",
        "uncertainty mm": f"{pp.uncertainty_mean_mm.mean():.2f}" if "uncertainty_mean_mm" in pp else "n/a",
        "s / pair": f"{pp.seconds.mean():.1f}",
    }


def before_row(run: Path) -> dict | None:
    path = run / "metrics_before.csv"
    if not path.is_file():
        return None
    b = pd.read_csv(path)
    return {
        "run": "before registration (affine only)",
        "DSC (samples)": f"{b.dsc.mean():.3f} ± {b.groupby('pair').dsc.mean().std():.3f}",
        "DSC (mean transf.)": f"{b.dsc.mean():.3f}",
        "ASD mm": f"{b.asd_mm.mean():.2f}",
        "HD95 mm": f"{b.hd95_mm.mean():.2f}",
        "folding voxels": 0,
        "SDlogJ": "0",
        "uncertainty mm": "n/a",
        "s / pair": "0",
    }


def per_pair(runs: list[Path]) -> pd.DataFrame:
    """Mean DSC per pair: before registration, then each run's posterior mean and samples."""
    cols = {}
    first = runs[0] / "metrics_before.csv"
    if first.is_file():
        cols["before"] = pd.read_csv(first).groupby("pair").dsc.mean()
    for run in runs:
        name = run.name.removeprefix("test_")
        if (run / "metrics_mean.csv").is_file():
            cols[f"{name} mean"] = pd.read_csv(run / "metrics_mean.csv").groupby("pair").dsc.mean()
        cols[f"{name} samples"] = pd.read_csv(run / "metrics.csv").groupby("pair").dsc.mean()
    return pd.DataFrame(cols).round(3)


def _print(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--per-pair", action="store_true", help="also print the mean DSC per pair and run")
    args = ap.parse_args()
    runs = [r for r in args.runs if (r / "metrics.csv").is_file()]
    if not runs:
        raise SystemExit("demo_table: no evaluated run folder (metrics.csv) among the arguments")
    before = before_row(runs[0])
    _print(([before] if before else []) + [row(r) for r in runs])
    if args.per_pair:
        print()
        table = per_pair(runs)
        _print([{"pair": pair, **{c: f"{v:.3f}" for c, v in values.items()}} for pair, values in table.iterrows()])


if __name__ == "__main__":
    main()
