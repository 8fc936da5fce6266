"""``learnsim-register --pairs PAIRS.csv --out DIR [--metric M] [--devices N] [--num-nodes M] [--fresh] [key=value ...]``.

Registers every pair of a pair list (the CSV format of ``learnsim-data``: columns ``fixed``, ``moving`` and optional
``fixed_mask``, ``moving_mask``, ``fixed_seg``, ``moving_seg``; one fixed image, the atlas) with a baseline or a
learnt metric, sharded over processes (``--devices N`` on this machine, ``--num-nodes M`` under SLURM or torchrun)
and resumable: the same command again skips the pairs whose outputs are complete (checked by their hashes).

``DIR/pairs/<pair_id>/`` holds each pair's ``warped.nii.gz``, ``warped_seg.nii.gz`` (with a ``moving_seg``
column), ``disp_mm.nii.gz``, ``uncertainty_mm.nii.gz``, ``output_grid.png`` and ``summary.json``; ``DIR/per_pair.csv``
one row per pair (folding, SDlogJ, final loss, seconds, and DSC with both segmentations), ``DIR/summary.json``
the means (:mod:`learnsim.evaluation.evaluator`; ``metrics.csv`` when the pairs have segmentations).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from learnsim.cli.help import version_line
from learnsim.evaluation.cohort import MANIFEST
from learnsim.interrupt import run_command

__all__ = ["main", "build_registration"]

_PROG = "learnsim-register"
#: learnsim-register's keys that are not the q_v fit's (the data, the sampling, the device)
_NOT_FIT = ("dims", "histmatch", "no_samples", "seed", "device")


def build_registration(metric: str, device: torch.device, **kwargs: Any):
    """The q_v fit :func:`learnsim.register` runs for ``metric`` and the fit's ``key=value`` settings, on ``device``
    (built once per rank, then used for every pair)."""
    from learnsim.api import _resolve_likelihood, register_schedule
    from learnsim.registration import VariationalRegistration
    from learnsim.sobolev import SobolevSmoother
    from learnsim.transformation import TransformationKind

    kw = dict(kwargs)
    kind = TransformationKind(kw.pop("transformation", "svf"))
    resolved, likelihood = _resolve_likelihood(metric, kw.pop("data_weight", None), None)
    schedule = register_schedule(resolved.energy_kind, kw.pop("levels", None), kw.pop("no_iters", None),
                                 kw.pop("lr", None), kw.pop("level_iters", None), kw.pop("level_lr", None))
    if schedule.levels > 1 and kind is not TransformationKind.SVF:
        raise ValueError(f"levels={schedule.levels} needs transformation=svf (the pyramid transfers dense velocities)")
    from learnsim.defaults import REGISTER_INT_DOWNSIZE, REGISTER_NO_STEPS

    transformation = kind.build(kw.pop("no_steps", REGISTER_NO_STEPS), kw.pop("cps", 2),
                                kw.pop("int_downsize", REGISTER_INT_DOWNSIZE))
    sobolev = SobolevSmoother(kw.pop("sobolev", True), kw.pop("sobolev_s", 3), kw.pop("sobolev_lambda", 0.5))
    return VariationalRegistration.paper(
        resolved.to(device), w_reg=kw.pop("w_reg", None), transformation=transformation, sobolev=sobolev.to(device),
        no_iters=schedule.iters[-1], lr=schedule.lr[-1], uniform_noise=0.0, levels=schedule.levels,
        level_iters=schedule.iters, level_lr=schedule.lr, likelihood=likelihood,
        **{k: kw.pop(k) for k in ("sigma_init", "u_init", "rank") if k in kw},
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"{_PROG} --pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=version_line(_PROG))
    ap.add_argument("--pairs", required=True, help="the pair list (CSV: fixed, moving[, fixed_mask, moving_mask, "
                                                   "fixed_seg, moving_seg]); relative paths from its folder")
    ap.add_argument("--out", required=True, help="the run folder (new, or one of an earlier run to resume)")
    ap.add_argument("--metric", default=None, help="ssd | lcc | a learnsim checkpoint (.ckpt); default lcc")
    ap.add_argument("--fresh", action="store_true", help="start over in --out (removes only learnsim's outputs)")
    ap.add_argument("--no-figures", action="store_true", help="skip the per-pair output_grid.png")
    ap.add_argument("--devices", type=int, default=1, help="processes on this machine (GPUs with --accelerator gpu)")
    ap.add_argument("--num-nodes", type=int, default=1, help="nodes (launched by SLURM or torchrun)")
    ap.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"), help="of the processes")
    ap.add_argument("overrides", nargs="*", help="key=value, as learnsim-register's (dims=128, no_iters=..., ...)")
    return ap


def _dataset(args: argparse.Namespace, kwargs: dict[str, Any]):
    """The pair list as a :class:`~learnsim.data.dataset.PairDataset`, on a cube of ``dims`` voxels (default: the
    atlas' largest side, so nothing is resampled down)."""
    from learnsim.data.dataset import PairDataset
    from learnsim.data.preprocess import Grid
    from learnsim.data.validate import read_pairs

    pairs = Path(args.pairs)
    if not pairs.is_file():
        raise ValueError(f"--pairs {pairs} does not exist")
    dims = kwargs.get("dims")
    if dims is None:
        first = read_pairs(pairs)[0].fixed
        dims = max(Grid.from_nifti(first).shape)
        print(f"{_PROG}: dims={dims} (the atlas' largest side; give dims=N to resample)")
    return PairDataset(pairs, dims=dims, intensity="histmatch" if kwargs.get("histmatch") else "minmax")


def _check_out(out: Path) -> None:
    """``--out`` is new, empty, or an earlier cohort run (its :data:`MANIFEST`): never another folder."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ValueError(f"--out {out} exists and is not a cohort run folder (no {MANIFEST}); choose a new folder")


def _run(argv: list[str]) -> int:
    from learnsim.api import resolve_device
    from learnsim.cli.register import _parse_overrides
    from learnsim.defaults import REGISTER_METRIC
    from learnsim.evaluation.sharding import CohortJob, fabric_settings, launch, run_rank
    from learnsim.ranges import check_register_settings

    args = _parser().parse_intermixed_args(argv)
    kwargs = _parse_overrides(args.overrides)
    check_register_settings(kwargs)
    device = resolve_device(kwargs.get("device", "auto"))
    out, metric = Path(args.out), args.metric or REGISTER_METRIC
    _check_out(out)
    if metric.endswith(".ckpt"):  # the checkpoint's intensity handling and squarings, unless given (as for one pair)
        from learnsim.cli.register import _checkpoint_defaults

        _checkpoint_defaults(metric, kwargs)
    fabric = fabric_settings({"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes})
    dataset = _dataset(args, kwargs)
    fit = {k: v for k, v in kwargs.items() if k not in _NOT_FIT}
    build_registration(metric, torch.device("cpu"), **fit)  # a bad setting fails here, before any process starts
    n_samples = int(kwargs.get("no_samples", 5))
    settings = {"pairs": str(Path(args.pairs).resolve()), "metric": str(metric),
                "overrides": {k: v for k, v in kwargs.items() if k != "device"},  # a resumed run may move device
                "figures": not args.no_figures, "dims": list(dataset.dims)}
    if metric.endswith(".ckpt"):  # a retrained file under the same name is another run
        from learnsim.io import sha256_file

        settings["metric_sha256"] = sha256_file(metric)
    job = CohortJob(out, dataset, list(dataset.pair_ids), settings, partial(build_registration, metric, **fit),
                    {"save_nifti": True, "figures": not args.no_figures, "seed": int(kwargs.get("seed", 0)),
                     "metric_samples": n_samples, "run_name": out.name},
                    n_draw=n_samples, seed=int(kwargs.get("seed", 0)), fresh=args.fresh, prog=_PROG)
    summary = launch(fabric, partial(run_rank, job), device)
    if summary is not None:
        print(f"{_PROG}: {summary.get('n_pairs', 0)} pairs registered in {out} (per_pair.csv, summary.json, pairs/)"
              + (f"; {summary['n_failed']} FAILED (summary.json, failed_pairs)" if summary.get("n_failed") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``learnsim-register --pairs``: status 0, 1 with one line for a bad input, 130 / 143 when interrupted."""
    return run_command(_PROG, partial(_run, sys.argv[1:] if argv is None else list(argv)))
