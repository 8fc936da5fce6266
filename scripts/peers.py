#!/usr/bin/env python
"""Peer benchmark: register a learnsim cohort's test pairs with FireANTs (greedy) and ANTs SyN on this machine.

    python scripts/peers.py COHORT --out DIR [--methods fireants ants] [--threads 2] [--dims N]
                            [--intensity histmatch|minmax] [--max-pairs N] [--pairs ID ...] [--no-nifti]
                            [--no-figures] [--no-surface] [--seed 0]

``COHORT`` is a learnsim cohort folder (``learnsim-data demo``): its ``test.csv`` lists the pairs (``fixed,
moving, fixed_mask, moving_mask, fixed_seg, moving_seg``, paths relative to the CSV). Every pair is loaded by
learnsim's own :class:`learnsim.data.dataset.PairDataset` (the atlas grid, intensities in [0, 1] inside the brain
mask, ``histmatch`` by default as in the demo's ``learnsim-test`` config), so the peers get exactly the volumes
learnsim registers, and are scored by learnsim's own :class:`learnsim.evaluation.evaluator.Evaluator`.

Methods (both on the CPU, ``--threads`` threads, default 2):

* ``fireants``: FireANTs 1.5.0 ``GreedyRegistration`` (greedy diffeomorphic, compositive warp, local normalised
  cross-correlation, scales 4-2-1, 200/100/50 iterations, its other defaults: Adam, lr 0.5, CC window 7,
  gradient / warp smoothing sigma 1.0 / 0.5 voxel). Threads: ``torch.set_num_threads``.
* ``ants``: ANTsPy (antspyx 0.6.3) ``ants.registration(type_of_transform="SyN")`` with its defaults (an affine
  stage, then SyN with Mattes MI). Threads: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; seed ``ANTS_RANDOM_SEED``
  (both set before ``ants`` is imported).

Each method's transformation is turned into a displacement in learnsim's convention (voxels, channel ``c`` along
tensor axis ``2 + c``, pull-back ``phi(x) = x + u(x)``): FireANTs' fixed->moving sampling coordinates
(``get_warped_coordinates``, grid_sample's normalised ``(x, y, z)``, ``align_corners=True``), ANTs' composite
forward transform written as a displacement field (``apply_transforms(..., compose=...)``, mm, converted with the
voxel spacing; the images are handed to ANTs with identity direction and zero origin, so ITK axis ``c`` is tensor
axis ``2 + c``). The Evaluator then warps the moving segmentation with learnsim's nearest-neighbour
``warp_labels`` and computes DSC / ASD / HD95 and folding (``det J <= 0`` of ``id + u``,
:func:`learnsim.spatial.jacobian_det`) exactly as for learnsim's own runs. As a check of the conversion, the
segmentation warped by the tool itself (FireANTs: one-hot interpolation + argmax; ANTs: ``genericLabel``) is
scored too (``dsc_native_mean``), and ``native_warp_mad`` is the mean absolute difference, inside the fixed brain
mask, between the moving image warped by learnsim with the converted displacement and by the tool (intensity
units of [0, 1]; a wrong axis order gives ~0.1, a right one ~0.01 or less).

Outputs under ``--out``:

* ``<run>/`` per method (``fireants_greedy``, ``ants_syn``): an evaluated run folder as ``learnsim-test`` writes
  it (``metrics.csv``, ``metrics_mean.csv``, ``metrics_before.csv``, ``per_pair.csv``, ``summary.json``, per-pair
  NIfTI maps and figures), with one "sample" per pair (the deterministic transformation), so
  ``learnsim-compare --table LEARNSIM_RUN DIR/fireants_greedy DIR/ants_syn`` puts the peers' rows beside
  learnsim's, same definitions, unchanged compare code. ``per_pair.csv`` adds ``method``, ``dsc_before_mean``,
  ``dsc_native_mean``, ``native_warp_mad``, ``threads``; ``peer.json`` records the method's settings and versions.
* ``peers_per_pair.csv``: one row per pair x method: ``method, pair, dsc_before_mean, dsc_mean (after),
  dsc_native_mean, folding_voxels, folding_pct, sdlogj, seconds, cpu_seconds, native_warp_mad, threads`` (column
  names as in ``learnsim-test``'s ``per_pair.csv``; DSC = mean over the structures present in the pair, seconds =
  wall time of the registration call alone, excluding loading and evaluation; cpu_seconds = the process' CPU time
  over all its threads in that call: on a busy machine, wall seconds well above ``cpu_seconds / threads`` mean
  the run waited for cores).
* ``peers_summary.csv``: one row per method: means over pairs of those columns (DSC before / after, folding
  voxels, seconds per pair) and ``n_pairs``; also printed as a markdown table.

Install the peers with ``pip install .[peers]`` (never into an environment whose torch must stay the CPU wheel
unless torch is pinned: ``pip install torch==2.13.0 .[peers]``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METHODS",
    "PerPairRow",
    "PeerResult",
    "MissingPeerError",
    "PER_PAIR_COLUMNS",
    "SUMMARY_COLUMNS",
    "require_peer",
    "configure_threads",
    "fireants_coords_to_displacement",
    "ants_field_to_displacement",
    "mean_dsc",
    "summarise",
    "write_csv",
    "markdown_table",
    "build_parser",
    "main",
]

INSTALL_HINT = "pip install .[peers]"


@dataclass(frozen=True)
class Method:
    """A peer method: its command-line name, run-folder name, the module it needs and a description."""

    name: str
    run_dir: str
    module: str
    package: str
    description: str


METHODS: dict[str, Method] = {
    "fireants": Method(
        "fireants",
        "fireants_greedy",
        "fireants",
        "fireants",
        "FireANTs greedy (CC, scales 4-2-1, 200/100/50 iterations)",
    ),
    "ants": Method("ants", "ants_syn", "ants", "antspyx", "ANTs SyN (antspyx defaults)"),
}

#: Columns of ``peers_per_pair.csv`` (names as in learnsim-test's ``per_pair.csv`` where they exist there).
PER_PAIR_COLUMNS = [
    "method",
    "pair",
    "dsc_before_mean",
    "dsc_mean",
    "dsc_native_mean",
    "folding_voxels",
    "folding_pct",
    "sdlogj",
    "seconds",
    "cpu_seconds",
    "native_warp_mad",
    "threads",
]
#: Columns of ``peers_summary.csv``: the per-pair ones, averaged over pairs (no pair name, no warp check).
SUMMARY_COLUMNS = ["method", "n_pairs", *(c for c in PER_PAIR_COLUMNS[2:] if c != "native_warp_mad")]
_MEAN_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c not in ("method", "n_pairs", "threads"))


class MissingPeerError(RuntimeError):
    """A peer registration package is not installed."""


#: The import function of :func:`require_peer` (replaced by tests to simulate a missing or present package).
_import: Callable[[str], Any] = importlib.import_module


def require_peer(method: str) -> Any:
    """Import the package a peer method needs and return the module.

    Args:
        method: a key of :data:`METHODS`.
    Raises:
        MissingPeerError: the package is missing; the message names it and says ``pip install .[peers]``.
    """
    spec = METHODS[method]
    try:
        # FireANTs prints its fused-ops status on import; keep stdout for our own progress lines
        with contextlib.redirect_stdout(io.StringIO()):
            return _import(spec.module)
    except ImportError as exc:
        raise MissingPeerError(
            f"peers.py: method {method!r} needs the Python package {spec.package!r}, which is not installed "
            f"({exc}). Install the peer registration packages with: {INSTALL_HINT}"
        ) from exc


def configure_threads(threads: int, seed: int) -> None:
    """Set the CPU thread count of every library before the peers are imported.

    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (ANTs), ``OMP_NUM_THREADS`` / ``NUMBA_NUM_THREADS`` (learnsim's
    evaluation) and ``ANTS_RANDOM_SEED`` are environment variables read at import or start-up; torch's intra-op
    pool (FireANTs) is set with :func:`torch.set_num_threads` if torch is already imported.

    Args:
        threads: CPU threads (>= 1).
        seed: ANTs' random seed (its metric sampling).
    """
    if threads < 1:
        raise ValueError(f"peers.py: --threads must be >= 1; got {threads}")
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["ANTS_RANDOM_SEED"] = str(seed)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- coordinate conversions
def fireants_coords_to_displacement(coords: Any) -> Any:
    """FireANTs' warped coordinates -> learnsim displacement.

    Args:
        coords: ``[1, D, H, W, 3]`` tensor: for every fixed voxel, the moving-image location it samples, in
            grid_sample's normalised ``(x, y, z) = (W, H, D)`` coordinates with ``align_corners=True`` (-1 and 1
            are the centres of the first and last voxels).
    Returns:
        ``[1, 3, D, H, W]`` float32 displacement in voxels, channel ``c`` along tensor axis ``2 + c``.
    """
    import torch

    from learnsim.spatial import identity_grid

    if coords.dim() != 5 or coords.shape[-1] != 3:
        raise ValueError(f"fireants_coords_to_displacement: coords must be [B, D, H, W, 3]; got {tuple(coords.shape)}")
    shape = coords.shape[1:4]  # (D, H, W)
    size_xyz = torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float64, device=coords.device)
    vox_xyz = (coords.double() + 1.0) * 0.5 * (size_xyz - 1.0)
    vox = vox_xyz.flip(-1).permute(0, 4, 1, 2, 3)  # channels (D, H, W)
    return (vox - identity_grid(shape, coords.device, torch.float64)).float()


def ants_field_to_displacement(field_mm: np.ndarray, spacing: Sequence[float]) -> Any:
    """ANTs displacement field (image axes = tensor axes, identity direction) -> learnsim displacement.

    Args:
        field_mm: ``[D, H, W, 3]`` displacement in mm; component ``c`` along ITK axis ``c``, which is tensor axis
            ``2 + c`` for images built with ``ants.from_numpy`` from ``[D, H, W]`` arrays with identity direction.
        spacing: voxel size in mm along ``(D, H, W)``.
    Returns:
        ``[1, 3, D, H, W]`` float32 displacement in voxels.
    """
    import torch

    field_mm = np.asarray(field_mm)
    if field_mm.ndim != 4 or field_mm.shape[-1] != 3:
        raise ValueError(f"ants_field_to_displacement: field must be [D, H, W, 3]; got {field_mm.shape}")
    vox = field_mm.astype(np.float64) / np.asarray(spacing, dtype=np.float64).reshape(1, 1, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(vox.transpose(3, 0, 1, 2))).float()[None]


# ----------------------------------------------------------------------------------------------------- registration
@dataclass
class PeerResult:
    """One peer registration: the transformation in learnsim's convention and the tool's own warps."""

    disp: Any  # [1, 3, D, H, W] voxels
    seconds: float  # wall seconds of the registration call
    cpu_seconds: float  # CPU seconds of this process (all its threads) during the registration call
    native_seg: Any  # [1, 1, D, H, W] int64, the moving segmentation warped by the tool
    native_warped: Any  # [1, 1, D, H, W] float32, the moving image warped by the tool
    params: dict[str, Any] = field(default_factory=dict)


def _relabel(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map -> (contiguous indices 0..K-1, the labels in index order) so one-hot maps stay small."""
    labels, inverse = np.unique(seg, return_inverse=True)
    return inverse.reshape(seg.shape).astype(np.int32), labels


def register_fireants(
    fixed: np.ndarray, moving: np.ndarray, moving_seg: np.ndarray, spacing: Sequence[float], progress: bool
) -> PeerResult:
    """FireANTs greedy registration of ``moving`` to ``fixed`` on the CPU.

    Args:
        fixed, moving: ``[D, H, W]`` float32 intensities on one grid.
        moving_seg: ``[D, H, W]`` integer labels of ``moving``.
        spacing: voxel size in mm along ``(D, H, W)``.
        progress: show FireANTs' own progress bar.
    """
    import torch

    require_peer("fireants")
    import logging

    with contextlib.redirect_stdout(io.StringIO()):  # FireANTs prints its fused-ops status on import
        import SimpleITK as sitk
        from fireants.io.image import BatchedImages, Image
        from fireants.registration.greedy import GreedyRegistration
    # On the CPU FireANTs runs its PyTorch path; its INFO lines and its "fused ops not found" warnings (repeated at
    # every scale) would drown our progress lines.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("fireants")]:
        logging.getLogger(name).setLevel(logging.ERROR)

    def image(arr: np.ndarray, **kwargs: Any) -> BatchedImages:
        itk = sitk.GetImageFromArray(arr)  # numpy [D, H, W] -> ITK (x, y, z) = (W, H, D)
        itk.SetSpacing([float(s) for s in reversed(spacing)])
        return BatchedImages([Image(itk, device="cpu", **kwargs)])

    params: dict[str, Any] = {"scales": [4, 2, 1], "iterations": [200, 100, 50], "loss_type": "cc"}
    with contextlib.redirect_stdout(sys.stderr):
        fixed_b, moving_b = image(fixed.astype(np.float32)), image(moving.astype(np.float32))
        t0, c0 = time.perf_counter(), time.process_time()
        reg = GreedyRegistration(
            params["scales"], params["iterations"], fixed_b, moving_b, loss_type="cc", progress_bar=progress
        )
        reg.optimize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    params.update(
        deformation_type=reg.deformation_type,
        optimizer_lr=getattr(reg.warp, "lr", None),
        cc_kernel_size=getattr(reg.loss_fn, "kernel_size", None),
    )
    with torch.no_grad():
        coords = reg.get_warped_coordinates(fixed_b, moving_b)
        disp = fireants_coords_to_displacement(coords)
        warped = reg.evaluate(fixed_b, moving_b).float()
        idx, labels = _relabel(moving_seg)
        with contextlib.redirect_stdout(sys.stderr):
            seg_b = image(idx, is_segmentation=True, is_onehot=True)
        probs = reg.evaluate(fixed_b, seg_b)  # [1, K, D, H, W], one-hot channels interpolated
        native_seg = torch.from_numpy(labels.astype(np.int64))[probs.argmax(1, keepdim=True)]
    return PeerResult(disp, seconds, cpu, native_seg, warped, params)


def register_ants(
    fixed: np.ndarray,
    moving: np.ndarray,
    moving_seg: np.ndarray,
    spacing: Sequence[float],
    progress: bool = False,
    seed: int = 0,
) -> PeerResult:
    """ANTs SyN (``ants.registration(type_of_transform="SyN")``, defaults) of ``moving`` to ``fixed``.

    The images go to ANTs with zero origin, identity direction and ``spacing``, so ITK axis ``c`` is array axis
    ``c``. Arguments as in :func:`register_fireants` (``progress`` is unused: ANTs' verbose log is hundreds of
    lines; the caller prints a line per pair); ``seed`` is ANTs' random seed, read from ``ANTS_RANDOM_SEED``
    (:func:`configure_threads`) by ``antsRegistration``; it is recorded here. Multi-threaded ANTs is not bitwise
    reproducible (the per-thread metric sums differ in order), so repeated runs differ slightly.
    """
    import torch

    ants = require_peer("ants")

    def image(arr: np.ndarray) -> Any:
        return ants.from_numpy(
            np.ascontiguousarray(arr, dtype=np.float32),
            origin=(0.0, 0.0, 0.0),
            spacing=tuple(float(s) for s in spacing),
            direction=np.eye(3),
        )

    fixed_a, moving_a = image(fixed), image(moving)
    params: dict[str, Any] = {"type_of_transform": "SyN", "random_seed": seed}
    with tempfile.TemporaryDirectory(prefix="peers_ants_") as tmp:
        prefix = str(Path(tmp) / "reg_")
        t0, c0 = time.perf_counter(), time.process_time()
        out = ants.registration(fixed_a, moving_a, type_of_transform="SyN", outprefix=prefix)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        fwd = list(out["fwdtransforms"])
        params["fwdtransforms"] = [Path(p).name for p in fwd]
        comp = ants.apply_transforms(fixed_a, moving_a, transformlist=fwd, compose=str(Path(tmp) / "comp_"))
        if comp is None:
            raise RuntimeError("peers.py: ants.apply_transforms(compose=...) wrote no composite displacement field")
        field_img = ants.image_read(comp)
        field_np = field_img.numpy()
        if field_np.shape != (*fixed.shape, 3):
            raise RuntimeError(f"peers.py: ANTs displacement field has shape {field_np.shape}, not {(*fixed.shape, 3)}")
        disp = ants_field_to_displacement(field_np, spacing)
        warped = ants.apply_transforms(fixed_a, moving_a, transformlist=fwd, interpolator="linear").numpy()
        seg_w = ants.apply_transforms(
            fixed_a, image(moving_seg.astype(np.float32)), transformlist=fwd, interpolator="genericLabel"
        ).numpy()
    native_seg = torch.from_numpy(np.rint(seg_w).astype(np.int64))[None, None]
    native_warped = torch.from_numpy(np.asarray(warped, dtype=np.float32))[None, None]
    return PeerResult(disp, seconds, cpu, native_seg, native_warped, params)


# ------------------------------------------------------------------------------------------------------- bookkeeping
def mean_dsc(warped_seg: Any, fixed_seg: Any, moving_seg: Any, structures: Mapping[int, str]) -> float:
    """Mean DSC over the structures the moving segmentation labels (learnsim's rule: a structure absent from the
    moving segmentation was never registrable and is skipped; one absent from the fixed one is NaN and skipped).

    Uses :func:`learnsim.evaluation.metrics.dice_per_structure`. Returns NaN when no structure counts.
    """
    import torch

    from learnsim.evaluation.metrics import dice_per_structure

    present = set(torch.unique(moving_seg).tolist())
    labels = [k for k in structures if k in present]
    scores = [v for v in dice_per_structure(warped_seg, fixed_seg, labels).values() if math.isfinite(v)]
    return float(np.mean(scores)) if scores else float("nan")


@dataclass
class PerPairRow:
    """One ``peers_per_pair.csv`` row."""

    method: str
    pair: str
    dsc_before_mean: float
    dsc_mean: float
    dsc_native_mean: float
    folding_voxels: int
    folding_pct: float
    sdlogj: float
    seconds: float
    cpu_seconds: float
    native_warp_mad: float
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in PER_PAIR_COLUMNS}


def _finite_mean(values: Sequence[Any]) -> float:
    arr = np.asarray([float("nan") if v is None else float(v) for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-method means over pairs of the ``peers_per_pair.csv`` rows (methods in order of first appearance).

    DSC columns: mean over pairs of the per-pair mean DSC; ``folding_voxels``: mean folding voxels per pair;
    ``seconds``: mean registration seconds per pair. NaNs are skipped; ``n_pairs`` counts the rows.
    """
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    out = []
    for m in methods:
        sub = [r for r in rows if str(r["method"]) == m]
        threads = sorted({int(r["threads"]) for r in sub if r.get("threads") not in (None, "")})
        out.append(
            {
                "method": m,
                "n_pairs": len(sub),
                **{c: _finite_mean([r.get(c) for r in sub]) for c in _MEAN_COLUMNS},
                "threads": threads[0] if len(threads) == 1 else ",".join(map(str, threads)),
            }
        )
    return out


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with the header ``columns`` to ``path`` (atomically: a temporary file, then a rename).

    Floats are written with full precision, NaN as an empty cell. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {c: "" if isinstance(row.get(c), float) and not math.isfinite(row[c]) else row.get(c, "") for c in columns}
            )
    os.replace(tmp, path)
    return path


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a markdown table: method, pairs, DSC before -> after (tool's own label warp), folding
    voxels per pair, seconds per pair, threads."""

    def f(v: Any, fmt: str) -> str:
        return format(float(v), fmt) if v is not None and math.isfinite(float(v)) else "n/a"

    lines = [
        "| method | pairs | DSC before | DSC after | DSC after (tool's label warp) | folding voxels | s/pair | threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        name = METHODS[r["method"]].description if r["method"] in METHODS else r["method"]
        lines.append(
            f"| {name} | {r['n_pairs']} | {f(r['dsc_before_mean'], '.3f')} | {f(r['dsc_mean'], '.3f')} | "
            f"{f(r['dsc_native_mean'], '.3f')} | {f(r['folding_voxels'], '.1f')} | {f(r['seconds'], '.1f')} | "
            f"{r['threads']} |"
        )
    return "\n".join(lines)


def _versions(method: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", METHODS[method].package, "SimpleITK", "learnsim"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


# ------------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="peers.py",
        description="Register a learnsim cohort's test pairs with FireANTs greedy and ANTs SyN and score them "
        "with learnsim's evaluation (run folders learnsim-compare reads, plus peers_per_pair.csv and "
        "peers_summary.csv).",
    )
    p.add_argument("cohort", help="cohort folder with test.csv (learnsim-data demo)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--csv", default="test.csv", help="pair list inside the cohort (default test.csv)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: both")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (default 2)")
    p.add_argument("--dims", type=int, default=None, help="working grid size (default: the atlas' own grid)")
    p.add_argument(
        "--intensity",
        choices=("histmatch", "minmax"),
        default="histmatch",
        help="intensity handling of learnsim's loader (default histmatch, as the demo's learnsim-test config)",
    )
    p.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs")
    p.add_argument("--pairs", nargs="+", default=None, help="only these pair ids (moving subject folder names)")
    p.add_argument("--seed", type=int, default=0, help="ANTs random seed (default 0)")
    p.add_argument("--no-nifti", action="store_true", help="skip the per-pair NIfTI maps")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--no-surface", action="store_true", help="DSC only (no ASD / HD95)")
    return p


def _atlas_dims(csv_path: Path) -> int:
    from learnsim.data.preprocess import Volume
    from learnsim.data.validate import validate_pairs

    shape = Volume.load(validate_pairs(csv_path)[0].fixed).data.shape
    return int(max(shape))


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    configure_threads(args.threads, args.seed)
    # learnsim before torch (FireANTs imports torch): learnsim sets the OpenMP spin policy (GOMP_SPINCOUNT) that
    # torch's runtime reads when it loads, so the peers run under the same policy as learnsim's own runs.
    import learnsim  # noqa: F401

    for m in args.methods:  # fail before any work if a peer is missing
        require_peer(m)
    import torch

    torch.set_num_threads(args.threads)
    from learnsim.data.dataset import PairDataset
    from learnsim.evaluation.evaluator import Evaluator
    from learnsim.evaluation.metrics import STRUCTURES, spacing_from_affine
    from learnsim.spatial import warp

    csv_path = Path(args.cohort) / args.csv
    if not csv_path.is_file():
        raise FileNotFoundError(f"peers.py: {csv_path} does not exist (is {args.cohort} a learnsim cohort folder?)")
    dims = args.dims or _atlas_dims(csv_path)
    ds = PairDataset(csv_path, dims, intensity=args.intensity)
    indices = list(range(len(ds)))
    if args.pairs:
        unknown = sorted(set(args.pairs) - set(ds.pair_ids))
        if unknown:
            raise ValueError(f"peers.py: unknown pair ids {unknown}; the pairs are {ds.pair_ids}")
        indices = [i for i in indices if ds.pair_ids[i] in set(args.pairs)]
    if args.max_pairs is not None:
        indices = indices[: args.max_pairs]
    if not indices:
        raise ValueError("peers.py: no pair selected")
    out = Path(args.out)
    spacing = spacing_from_affine(ds.affine)
    evaluators = {
        m: Evaluator(
            out / METHODS[m].run_dir,
            save_nifti=not args.no_nifti,
            figures=not args.no_figures,
            seed=args.seed,
            metric_samples=1,
            surface_metrics=not args.no_surface,
            run_name=METHODS[m].run_dir,
        )
        for m in args.methods
    }
    for m in args.methods:
        info = {
            "method": m,
            "description": METHODS[m].description,
            "cohort": str(Path(args.cohort).resolve()),
            "csv": args.csv,
            "dims": dims,
            "intensity": args.intensity,
            "threads": args.threads,
            "seed": args.seed,
            "versions": _versions(m),
        }
        (out / METHODS[m].run_dir).mkdir(parents=True, exist_ok=True)
        (out / METHODS[m].run_dir / "peer.json").write_text(json.dumps(info, indent=2) + "\n")

    interactive = sys.stderr.isatty()
    rows: list[dict[str, Any]] = []
    n = len(indices)
    print(f"peers.py: {n} pair(s) of {csv_path} at {dims}^3, methods {' '.join(args.methods)}, {args.threads} threads")
    for k, i in enumerate(indices, 1):
        item = ds[i]
        pair = ds.pair_ids[i]
        fixed, moving = item["fixed"][None], item["moving"][None]  # [1, 1, D, H, W]
        fixed_seg, moving_seg = item["fixed_seg"][None], item["moving_seg"][None]
        fixed_mask = item["fixed_mask"][None]
        before = mean_dsc(moving_seg, fixed_seg, moving_seg, STRUCTURES)
        for m in args.methods:
            print(f"peers.py: pair {k}/{n} {pair}: {m} ...", flush=True)
            fn = register_fireants if m == "fireants" else register_ants
            kwargs = {"seed": args.seed} if m == "ants" else {}
            res = fn(
                fixed[0, 0].numpy(), moving[0, 0].numpy(), moving_seg[0, 0].numpy(), spacing, interactive, **kwargs
            )
            native = mean_dsc(res.native_seg, fixed_seg, moving_seg, STRUCTURES)
            with torch.no_grad():
                mine = warp(moving, res.disp)
                inside = fixed_mask > 0
                mad = float((mine - res.native_warped).abs()[inside].mean())
            row = evaluators[m].add_pair(
                pair,
                fixed,
                moving,
                fixed_seg,
                moving_seg,
                fixed_mask,
                ds.affine,
                res.disp[None],
                res.disp,
                res.seconds,
                {
                    "method": m,
                    "dsc_before_mean": before,
                    "dsc_native_mean": native,
                    "cpu_seconds": res.cpu_seconds,
                    "native_warp_mad": mad,
                    "threads": args.threads,
                },
            )
            rows.append(
                PerPairRow(
                    m,
                    pair,
                    before,
                    float(row["dsc_mean"]) if row["dsc_mean"] is not None else float("nan"),
                    native,
                    int(row["folding_voxels"]),
                    float(row["folding_pct"]),
                    float(row["sdlogj"]),
                    float(res.seconds),
                    float(res.cpu_seconds),
                    mad,
                    args.threads,
                ).as_dict()
            )
            print(
                f"peers.py: pair {k}/{n} {pair}: {m} {res.seconds:.1f} s ({res.cpu_seconds:.0f} CPU s), DSC {before:.3f} -> {rows[-1]['dsc_mean']:.3f} "
                f"(tool's label warp {native:.3f}), {row['folding_voxels']} folding voxels, warp check {mad:.1e}",
                flush=True,
            )
            write_csv(out / "peers_per_pair.csv", rows, PER_PAIR_COLUMNS)  # kept current: a stopped run keeps its rows
    for m, ev in evaluators.items():
        ev.finalize()
        print(f"peers.py: {m}: run folder {out / METHODS[m].run_dir} (learnsim-compare reads it)")
    summary = summarise(rows)
    write_csv(out / "peers_per_pair.csv", rows, PER_PAIR_COLUMNS)
    write_csv(out / "peers_summary.csv", summary, SUMMARY_COLUMNS)
    print(markdown_table(summary))
    print(f"peers.py: wrote {out / 'peers_per_pair.csv'} and {out / 'peers_summary.csv'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a missing peer package or bad input)."""
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except MissingPeerError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"peers.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
