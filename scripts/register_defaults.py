"""Measure learnsim.register settings on the demo test pairs: DSC before/after, folding voxels, seconds per pair.

    OMP_NUM_THREADS=1 python scripts/register_defaults.py --data /tmp/demo64 --metric ssd --setting default \
        --setting single:no_iters=256,lr=0.05 [--threads 1] [--csv out.csv]

A setting is ``NAME:key=value,...`` with the keyword arguments of :func:`learnsim.register` (lists with ``/``:
``level_iters=200/100/50``); ``default`` is no keywords at all. Used to choose the defaults of learnsim-register
(docs/usage.md, "Defaults of learnsim-register").
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from learnsim.api import register
from learnsim.data.preprocess import Grid, Volume, preprocess
from learnsim.evaluation.metrics import jacobian_stats, mean_dice


def _parse(setting: str) -> tuple[str, dict]:
    name, _, rest = setting.partition(":")
    kw: dict = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=", 1)
        if "/" in v:
            kw[k] = [int(x) if k == "level_iters" else float(x) for x in v.split("/")]
        elif v.lower() in ("true", "false"):
            kw[k] = v.lower() == "true"
        elif v == "auto":
            kw[k] = v  # no_steps=auto, data_weight=auto (the precision learnt in the fit)
        elif k in ("no_iters", "levels", "no_samples", "no_steps"):
            kw[k] = int(v)
        else:
            kw[k] = float(v)
    return name, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--metric", default="ssd")
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    rows = list(csv.DictReader(open(root / "test.csv")))[: args.pairs]
    out = []
    settings = [_parse(s) for s in args.setting or ["default"]]
    for row in rows:  # settings alternate within each pair: a loaded machine slows them alike (time ratios)
        for name, kw in settings:
            fixed_v = Volume.load(root / row["fixed"])
            grid = Grid(tuple(fixed_v.data.shape), fixed_v.affine)
            fseg = preprocess(fixed_v, grid, seg=Volume.load(root / row["fixed_seg"])).seg
            mseg = preprocess(Volume.load(root / row["moving"]), grid, seg=Volume.load(root / row["moving_seg"]),
                              apply_mask=False).seg
            t0 = time.perf_counter()
            res = register(root / row["fixed"], root / row["moving"], args.metric, moving_seg=root / row["moving_seg"],
                           fixed_mask=root / row["fixed_mask"], **kw)
            sec = time.perf_counter() - t0
            target = torch.from_numpy(np.asarray(fseg, dtype=np.int64))
            before = float(mean_dice(torch.from_numpy(np.asarray(mseg, dtype=np.int64)), target))
            after = float(mean_dice(res.warped_seg[0, 0], target))
            fold = jacobian_stats(res.disp)["folding_voxels"]
            r = {"setting": name, "metric": args.metric, "pair": Path(row["moving"]).parent.name, "dsc_before": before,
                 "dsc_after": after, "gain_points": 100 * (after - before), "folding": fold, "seconds": sec,
                 "fit_seconds": res.fit.seconds,
                 "data_weight": float(res.fit.precision.weight.mean()) if res.fit.precision is not None else None}
            out.append(r)
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    names = sorted({r["setting"] for r in out}, key=[r["setting"] for r in out].index)
    print("\n| setting | metric | DSC before | DSC after | gain (points) | folding voxels | s / pair |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        rs = [r for r in out if r["setting"] == n]
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("dsc_before", "dsc_after", "gain_points", "seconds")}
        print(f"| {n} | {args.metric} | {m['dsc_before']:.3f} | {m['dsc_after']:.3f} | {m['gain_points']:+.1f} | "
              f"{sum(r['folding'] for r in rs)} | {m['seconds']:.1f} |")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(out[0]))
            w.writeheader()
            w.writerows(out)


if __name__ == "__main__":
    main()
