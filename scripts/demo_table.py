#!/usr/bin/env python
"""Print the README's demo table: mean DSC / ASD / HD95 over pairs x samples x structures, the posterior-mean
DSC, folding, SDlogJ, uncertainty and registration time per run folder (written by learnsim-test)."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    rows = [row(r) for r in args.runs if (r / "metrics.csv").is_file()]
    if not rows:
        raise SystemExit("demo_table: no evaluated run folder (metrics.csv) among the arguments")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
