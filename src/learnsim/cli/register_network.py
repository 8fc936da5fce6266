"""``learnsim-register FIXED MOVING --network CKPT --out DIR [key=value ...]``: one-shot registration by a network.

``CKPT`` is a learnsim VoxelMorph checkpoint (``learnsim-train +experiment=vxm_*``) or a VoxelMorph file of the
original LearnSim release (``checkpoint_VXM_*.pt``, :mod:`learnsim.original_release`; learnsim does not ship them).
The network predicts the transformation in one pass (:mod:`learnsim.network_registration`), optionally refined by
``instance_optimisation_iters`` Adam steps (``instance_lr``, 0.01) on the energy of ``--metric`` (default: the
network's own training metric). The outputs and figures are those of the q_v registration (``warped.nii.gz``,
``warped_seg.nii.gz``, ``disp_mm.nii.gz``, ``registration.json``, ``output_grid.png``, ``label_overlay.png``) on the
fixed image's grid and affine, without ``uncertainty_mm.nii.gz`` (a network gives one transformation). The time per
pair (prediction + refinement, without file I/O) is printed and recorded (``registration.json``: ``fit_seconds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: the key=value settings of --network (a network has no q_v schedule)
NETWORK_KEYS = {"instance_optimisation_iters": int, "instance_lr": float, "device": str}
_PROG = "learnsim-register"


def _network_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in NETWORK_KEYS:
            raise SystemExit(f"{_PROG}: --network takes key=value settings {', '.join(sorted(NETWORK_KEYS))}; "
                             f"got {item!r} (the q_v settings do not apply to a network)")
        try:
            out[key] = NETWORK_KEYS[key](value)
        except ValueError as exc:
            raise SystemExit(f"{_PROG}: bad value for {key!r}: {value!r} ({exc})") from exc
    if out.get("instance_optimisation_iters", 0) < 0 or not 0 < out.get("instance_lr", 0.01) < 10:
        raise SystemExit(f"{_PROG}: instance_optimisation_iters must be >= 0 and instance_lr in (0, 10); got {out}")
    return out


def _check_paths(args: argparse.Namespace) -> Path:
    from learnsim.cli.register import _check_overwrite

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{_PROG}: {out} exists (use --overwrite)")
    if out.exists() or out.is_symlink():
        _check_overwrite(out)
    for label, path in (("fixed", args.fixed), ("moving", args.moving), ("--seg", args.seg),
                        ("--fixed-mask", args.fixed_mask), ("--fixed-seg", args.fixed_seg), ("--network", args.network)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{_PROG}: {label} file {path} does not exist")
    return out


def _refinement_metric(metric: str | None, network: Any) -> Any:
    """``--metric`` as given (a baseline name, a learnsim checkpoint, an original metric file), else the network's."""
    from learnsim.api import load_metric
    from learnsim.metric import build_metric
    from learnsim.metric_checkpoint import load_learnt_metric

    if metric is None:
        return network.metric
    if Path(metric).is_file():
        return load_learnt_metric(metric, "--metric") if str(metric).endswith(".ckpt") else load_metric(metric)
    return build_metric(metric)


def network_main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The ``--network`` path of ``learnsim-register`` (module docstring); ``args`` as its parser made them from
    ``argv`` (default ``sys.argv[1:]``)."""
    from learnsim.api import resolve_device
    from learnsim.cli.register import _write_outputs
    from learnsim.network_registration import open_network, register_with_network

    if getattr(args, "profile", False):
        raise SystemExit(f"{_PROG}: --profile times the q_v fit; it does not apply with --network")
    kwargs = _network_overrides(args.overrides)
    out = _check_paths(args)
    start = time.perf_counter()
    try:
        device = resolve_device(kwargs.get("device", "auto"))
        network = open_network(args.network)
        given = any(a == "--metric" or a.startswith("--metric=") for a in (sys.argv[1:] if argv is None else argv))
        metric = _refinement_metric(args.metric if given else None, network)
        iters = int(kwargs.get("instance_optimisation_iters", 0))
        res = register_with_network(args.fixed, args.moving, network, moving_seg=args.seg, fixed_mask=args.fixed_mask,
                                    metric=metric, instance_optimisation_iters=iters,
                                    instance_lr=float(kwargs.get("instance_lr", 0.01)), device=device)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise SystemExit(f"{_PROG}: {exc}") from exc
    for note in res.notes:
        print(f"{_PROG}: {note}")
    args.metric = f"network {Path(args.network).name}" + (f" + {iters} steps of {metric.spec['kind']}" if iters else "")
    steps = SimpleNamespace(iters=[iters] if iters else [], lr=[float(kwargs.get("instance_lr", 0.01))] if iters else [])
    line = _write_outputs(out, args, res, kwargs, steps, start)
    print(f"{_PROG}: wrote {out} (network {res.fit.seconds:.2f} s per pair)")
    print(line)
    return 0
