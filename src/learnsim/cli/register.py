"""``learnsim-register FIXED MOVING --out DIR [--seg MOVING_SEG] [key=value ...]``: one pair, NIfTI outputs.

Outputs (all on the fixed image's grid, with its affine): ``warped.nii.gz``, ``warped_seg.nii.gz`` (with --seg),
``disp_mm.nii.gz`` (mean displacement in mm, ``[D, H, W, 3]``), ``uncertainty_mm.nii.gz`` (std of the
displacement over the samples, mm) and ``registration.json``; figures (unless --no-figures): ``output_grid.png``
(fixed, moving, warped, difference, deformed grid, |u|, uncertainty) and, with --seg, ``label_overlay.png`` (the
moving segmentation's outlines on the fixed image before and after registration, beside the atlas' own outlines
from --fixed-seg). Everything is written to a staging folder that is renamed to ``--out`` only when complete: a
failed run leaves nothing behind.

A whole cohort: ``learnsim-register --pairs PAIRS.csv --out DIR [--devices N] [--fresh]`` (sharded over processes,
resumable; ``learnsim-register --pairs x --help`` and docs/cohort.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from learnsim import __version__, profiling
from learnsim.api import checkpoint_settings, load_checkpoint, register, register_schedule, resolve_device
from learnsim.checkpoint import ModuleKind, checkpoint_module
from learnsim.cli.help import version_line
from learnsim.defaults import REGISTER_METRIC
from learnsim.interrupt import disk_error, interrupt_status, sigterm_as_interrupt
from learnsim.io import save_nifti
from learnsim.outputs import MARKER as MARKER  # re-exported: the marker of a learnsim-register output
from learnsim.outputs import check_replaceable, make_stage, publish, write_marker
from learnsim.ranges import check_register_settings

# overrides accepted as key=value (the keyword arguments of learnsim.register)
_OVERRIDABLE = {
    name: p.default
    for name, p in inspect.signature(register).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("moving_seg", "fixed_mask", "affine", "progress", "on_level")
}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

_PROG = "learnsim-register"
#: what a learnsim-register output held before its marker named its files (an older marker stands for these)
_LEGACY_OUTPUTS = ("warped.nii.gz", "warped_seg.nii.gz", "disp_mm.nii.gz", "uncertainty_mm.nii.gz", "registration.json",
                   "output_grid.png", "label_overlay.png")


def _check_overwrite(out: Path) -> None:
    """Refuse to replace anything but a previous learnsim-register output holding only what it wrote (a folder
    whose :data:`~learnsim.outputs.MARKER` names its files; anything else in it is listed).

    ``/``, the home folder, the working directory and its parents are refused whatever they hold.
    """
    check_replaceable(out, _PROG, _LEGACY_OUTPUTS)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"learnsim-register: override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key not in _OVERRIDABLE:
            raise SystemExit(f"learnsim-register: unknown config key {key!r}; known keys: {', '.join(sorted(_OVERRIDABLE))}")
        default = _OVERRIDABLE[key]
        try:
            if key == "dims":
                parts = [int(v) for v in value.strip("[]()").split(",")]
                out[key] = parts[0] if len(parts) == 1 else tuple(parts)
            elif key in ("no_steps", "data_weight") and value.strip().lower() == "auto":
                out[key] = "auto"  # no_steps: fast mode; data_weight: one estimated from the pair (where supported)
            elif isinstance(default, bool):
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError("expected true or false")
                out[key] = value.lower() in _TRUE
            elif key in ("level_iters", "level_lr"):
                cast = int if key == "level_iters" else float
                out[key] = [cast(v) for v in value.strip("[]()").split(",") if v.strip()]
            elif isinstance(default, int) or key in ("no_iters", "levels", "no_steps"):
                out[key] = int(value)
            elif isinstance(default, float) or key in ("lr", "w_reg", "data_weight"):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError as exc:
            raise SystemExit(f"learnsim-register: bad value for {key!r}: {value!r} ({exc})") from exc
    return out


class _OnResultGrid:
    """The inputs brought onto the result's grid (``res.affine``, the fixed grid) by the same preprocessing
    :func:`learnsim.register` applies, each read and resampled once for the summary and the figures."""

    def __init__(self, args: argparse.Namespace, res) -> None:
        from learnsim.data.preprocess import Grid

        self.args, self.grid = args, Grid(tuple(res.warped.shape[2:]), res.affine)

    @functools.cached_property
    def fixed(self):
        """The fixed image (masked by ``--fixed-mask``) and ``--fixed-seg``: a ``Preprocessed``."""
        from learnsim.data.preprocess import Volume, preprocess

        a = self.args
        return preprocess(Volume.load(a.fixed), self.grid, mask=Volume.load(a.fixed_mask) if a.fixed_mask else None,
                          seg=Volume.load(a.fixed_seg) if a.fixed_seg else None)

    @functools.cached_property
    def moving(self):
        """The moving image (not masked) and ``--seg``: a ``Preprocessed``."""
        from learnsim.data.preprocess import Volume, preprocess

        a = self.args
        return preprocess(Volume.load(a.moving), self.grid, seg=Volume.load(a.seg) if a.seg else None,
                          apply_mask=False)


def _write_figures(stage: Path, args: argparse.Namespace, res, histmatch: bool,
                   inputs: _OnResultGrid | None = None) -> list[str]:
    """``output_grid.png`` and (with ``--seg``) ``label_overlay.png`` in ``stage``; returns the file names.

    The panels show the inputs exactly as they were registered (:class:`_OnResultGrid`).
    """
    from learnsim.data.preprocess import match_histogram
    from learnsim.evaluation.figures import label_overlay, output_grid

    inputs = inputs or _OnResultGrid(args, res)
    pf, pm = inputs.fixed, inputs.moving
    moving = match_histogram(pm.image, None, pf.image, pf.mask) if histmatch else pm.image
    short = lambda path: "/".join(Path(path).resolve().parts[-2:])  # noqa: E731  (folder/file names the subject)
    name = f"{short(args.moving)} -> {short(args.fixed)}"
    output_grid(stage / "output_grid.png", pf.image, moving, res.warped, res.disp, res.affine, res.uncertainty_mm,
                pf.mask, title=name)
    written = ["output_grid.png"]
    if res.warped_seg is not None:
        label_overlay(stage / "label_overlay.png", pf.image, res.warped_seg, res.affine, fixed_seg=pf.seg,
                      moving_seg=pm.seg, title=f"{name} ({args.metric})")
        written.append("label_overlay.png")
    return written


def summary_line(args: argparse.Namespace, res, seconds: float,
                 inputs: _OnResultGrid | None = None) -> tuple[str, dict]:
    """The one-line summary printed at the end, and its numbers: DSC before/after (with ``--seg`` and
    ``--fixed-seg``: mean over the fixed segmentation's labels, on the result grid), folding voxels of the mean
    transformation, seconds."""
    import torch

    from learnsim.evaluation.metrics import jacobian_stats, mean_dice

    numbers: dict = {"folding_voxels": int(jacobian_stats(res.disp)["folding_voxels"]), "seconds": round(seconds, 2)}
    parts = []
    if args.seg and args.fixed_seg and res.warped_seg is not None:
        inputs = inputs or _OnResultGrid(args, res)
        fixed_seg, moving_seg = inputs.fixed.seg, inputs.moving.seg  # the fixed mask does not change its labels
        target = torch.from_numpy(np.asarray(fixed_seg, dtype=np.int64))
        numbers["dsc_before"] = float(mean_dice(torch.from_numpy(np.asarray(moving_seg, dtype=np.int64)), target))
        numbers["dsc_after"] = float(mean_dice(res.warped_seg[0, 0].long(), target))
        parts.append(f"DSC {numbers['dsc_before']:.3f} -> {numbers['dsc_after']:.3f}")
    parts += [f"{numbers['folding_voxels']} folding voxels", f"{seconds:.1f} s"]
    return "learnsim-register: " + ", ".join(parts), numbers


def _energy(metric: str) -> str:
    """``"ssd"`` or ``"lcc"``: the energy of ``--metric`` (a checkpoint's spec says it)."""
    if str(metric).endswith(".ckpt"):
        spec = (load_checkpoint(metric).get("hyper_parameters") or {}).get("metric_spec") or {}
        return "lcc" if "lcc" in str(spec.get("kind", "")) else "ssd"
    if Path(metric).is_file():  # an original release CNN_SSD / CNN_LCC file (learnsim.original_release)
        from learnsim.api import load_metric

        return load_metric(metric, verbose=False).energy_kind.value
    return "lcc" if "lcc" in str(metric).lower() else "ssd"  # build_metric reads the name in any case


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--pairs" or a.startswith("--pairs=") for a in given):  # a cohort: learnsim.cli.register_cohort
        from learnsim.cli.register_cohort import main as cohort_main

        return cohort_main(given)
    try:
        with sigterm_as_interrupt():
            return _main(argv)
    except KeyboardInterrupt as exc:
        # Ctrl-C or SIGTERM: the staging folder is removed on the way out (see _write_outputs)
        print("learnsim-register: interrupted; nothing written", file=sys.stderr)
        raise SystemExit(interrupt_status(exc)) from None
    except OSError as exc:
        if (line := disk_error(exc)) is None:
            raise
        raise SystemExit(f"learnsim-register: {line}; nothing written") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="learnsim-register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=version_line("learnsim-register"))
    ap.add_argument("fixed", help="fixed image (the atlas), NIfTI")
    ap.add_argument("moving", help="moving image, NIfTI (resampled into the fixed grid through its affine if needed)")
    ap.add_argument("--out", required=True, help="output folder (must not exist, or --overwrite)")
    ap.add_argument("--seg", help="moving segmentation to warp (nearest)")
    ap.add_argument("--fixed-mask", help="fixed-image mask: energies are summed inside it")
    ap.add_argument("--fixed-seg", help="the atlas' own segmentation, for its outlines in label_overlay.png")
    ap.add_argument("--no-figures", action="store_true", help="skip output_grid.png and label_overlay.png")
    ap.add_argument("--metric", default=REGISTER_METRIC,
                    help=f"ssd | lcc | path to a learnsim checkpoint (.ckpt); default {REGISTER_METRIC}")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--network", metavar="CKPT",
                    help="register with a VoxelMorph network in one pass: a learnsim VoxelMorph checkpoint or an "
                         "original LearnSim release file (learnsim.cli.register_network); key=value: "
                         "instance_optimisation_iters, instance_lr, device")
    ap.add_argument("--profile", action="store_true",
                    help="print where the time goes: ms per q_v iteration of each stage, per pyramid level, and the "
                         "stages outside the fit (also in registration.json: profile)")
    ap.add_argument("overrides", nargs="*", help=f"key=value, keys: {', '.join(sorted(_OVERRIDABLE))}")
    return ap


def _checkpoint_defaults(metric: str, kwargs: dict) -> None:
    """Fill ``kwargs`` with the checkpoint's own intensity handling and number of squarings, unless given here;
    a VoxelMorph checkpoint (no learnt metric in it) or an unreadable file ends the program with one line."""
    try:
        ckpt = load_checkpoint(metric)
        if checkpoint_module(ckpt) is ModuleKind.VOXELMORPH:
            raise ValueError(f"{metric}: a VoxelMorph checkpoint holds no learnt metric (only its frozen "
                             "baseline); give a learnsim-train checkpoint, or evaluate it with learnsim-test ckpt=...")
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"learnsim-register: --metric {exc}") from exc
    for key, value in checkpoint_settings(ckpt).items():
        if key not in kwargs:
            kwargs[key] = value
            print(f"learnsim-register: {key}={value} from the checkpoint's training run")


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.network:  # one-shot registration by a network: its own settings and outputs path
        from learnsim.cli.register_network import network_main

        return network_main(args, argv)
    kwargs = _parse_overrides(args.overrides)
    try:  # every number against the shared table (learnsim.ranges) and the device, before anything runs
        check_register_settings(kwargs)
        resolve_device(kwargs.get("device", "auto"))
    except ValueError as exc:
        raise SystemExit(f"learnsim-register: {exc}") from exc
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"learnsim-register: {out} exists (use --overwrite)")
    if out.exists() or out.is_symlink():
        _check_overwrite(out)
    for label, path in (("fixed", args.fixed), ("moving", args.moving), ("--seg", args.seg), ("--fixed-mask", args.fixed_mask),
                        ("--fixed-seg", args.fixed_seg)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"learnsim-register: {label} file {path} does not exist")

    if str(args.metric).endswith(".ckpt"):
        _checkpoint_defaults(args.metric, kwargs)

    with profiling.profiling() if args.profile else contextlib.nullcontext() as prof:
        line = _run(args, kwargs, out)
    if prof is not None:
        import torch

        print(f"learnsim-register: profile (wall time; ms per q_v iteration of each stage, {torch.get_num_threads()} "
              "threads; learnsim.profiling)")
        print(prof.table())
    print(line)
    return 0


def _prefetch_output_modules() -> None:
    """Import what the summary and the figures need (matplotlib, pandas, scipy: ~1 s; MONAI is no longer among
    them) in a thread while the fit runs (the fit's kernels release the GIL); Python's import lock makes a later
    import wait for it."""
    import importlib
    import threading

    def load() -> None:
        for name in ("learnsim.evaluation.metrics", "learnsim.evaluation.figures", "learnsim.evaluation.uncertainty"):
            with contextlib.suppress(Exception):  # a failed import is raised where the module is used
                importlib.import_module(name)

    threading.Thread(target=load, name="learnsim-prefetch", daemon=True).start()


def _run(args: argparse.Namespace, kwargs: dict, out: Path) -> str:
    """Register, write the outputs, print what was done; returns the summary line."""
    from learnsim.registration import FitProgress

    start = time.perf_counter()
    _prefetch_output_modules()
    try:
        sched = register_schedule(_energy(args.metric), kwargs.get("levels"), kwargs.get("no_iters"), kwargs.get("lr"),
                                  kwargs.get("level_iters"), kwargs.get("level_lr"))
        with FitProgress(sum(sched.iters), desc="q_v") as bar:
            res = register(args.fixed, args.moving, args.metric, moving_seg=args.seg, fixed_mask=args.fixed_mask,
                           progress=bar, on_level=bar.on_level, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise SystemExit(f"learnsim-register: {exc}") from exc
    for note in res.notes:
        print(f"learnsim-register: {note}")

    line = _write_outputs(out, args, res, kwargs, sched, start)
    if res.fit.precision is not None:
        print(f"learnsim-register: data_weight=auto settled at {float(res.fit.precision.weight.mean()):.4g} "
              f"(registration.json: learnt_precision)")
    print(f"learnsim-register: wrote {out} (fit {res.fit.seconds:.1f} s)")
    return line


def _write_maps(stage: Path, res) -> None:
    """The NIfTI maps of a result in ``stage``: warped image (and labels), mm displacement, uncertainty."""
    aff = res.affine
    save_nifti(stage / "warped.nii.gz", res.warped[0, 0].numpy(), aff, np.float32)
    if res.warped_seg is not None:
        seg = res.warped_seg[0, 0].numpy()
        small = seg.size == 0 or (seg.min() >= -(2**15) and seg.max() < 2**15)  # ids >= 32768 need int32
        save_nifti(stage / "warped_seg.nii.gz", seg, aff, np.int16 if small else np.int32)
    save_nifti(stage / "disp_mm.nii.gz", res.disp_mm[0].permute(1, 2, 3, 0).numpy(), aff, np.float32)
    if res.uncertainty_mm is not None:
        save_nifti(stage / "uncertainty_mm.nii.gz", res.uncertainty_mm[0, 0].numpy(), aff, np.float32)


def _write_outputs(out: Path, args: argparse.Namespace, res, kwargs: dict, sched, start: float) -> str:
    """Write the NIfTI maps, ``registration.json`` and figures to a staging folder, then rename it to ``out``
    (replacing a previous learnsim-register output); returns the summary line."""
    stage = make_stage(out)
    try:
        # the maps are compressed in a second thread (zlib releases the GIL) while the summary and the figures are
        # made here; leaving the pool waits for it, also when something below fails (then the stage is removed)
        with ThreadPoolExecutor(max_workers=1) as pool:
            maps = pool.submit(_timed, _write_maps, stage, res)
            line, info = _summary_and_figures(stage, args, res, kwargs, sched, start)
            seconds = maps.result()
        if (prof := profiling.active_profile()) is not None:
            prof.add("NIfTI writing (overlapped)", seconds)
            info["profile"] = prof.as_dict()
        (stage / "registration.json").write_text(json.dumps(info, indent=2, default=str))
        write_marker(stage, _PROG)
        # checked again: the folder may have appeared or changed during the fit (another run with the same --out)
        publish(stage, out, args.overwrite, _PROG, _LEGACY_OUTPUTS)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return line


def _timed(fn, *args) -> float:
    """Run ``fn(*args)``; its wall time in seconds."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _summary_and_figures(stage: Path, args: argparse.Namespace, res, kwargs: dict, sched,
                         start: float) -> tuple[str, dict]:
    """The summary line and the contents of ``registration.json``; the figures written to ``stage``."""
    info = {
        "learnsim_version": __version__,
        "fixed": str(args.fixed), "moving": str(args.moving), "seg": args.seg, "metric": str(args.metric),
        "overrides": {k: v for k, v in kwargs.items()}, "notes": res.notes,
        "final_loss": float(res.fit.loss.mean()), "fit_seconds": res.fit.seconds,
        "total_seconds": time.perf_counter() - start, "no_samples": int(res.samples.shape[0]),
        "q_v_levels": list(sched.iters), "q_v_level_lr": list(sched.lr),
    }
    if res.fit.precision is not None:  # data_weight=auto: where the learnt precision settled, per update
        info["learnt_precision"] = res.fit.precision.as_dict()
    inputs = _OnResultGrid(args, res)
    with profiling.stage("summary"):
        line, numbers = summary_line(args, res, time.perf_counter() - start, inputs)
    info.update(numbers)
    if not args.no_figures:
        with profiling.stage("figures"):
            info["figures"] = _write_figures(stage, args, res, bool(kwargs.get("histmatch", False)), inputs)
    return line, info


if __name__ == "__main__":
    sys.exit(main())

