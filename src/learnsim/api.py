"""The public one-call API: :func:`register` a moving image to a fixed one, :func:`load_metric` from a checkpoint."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnsim.checkpoint import checkpoint_settings, load_checkpoint
from learnsim.defaults import (
    PAPER,
    REGISTER,
    REGISTER_HISTMATCH,
    REGISTER_INT_DOWNSIZE,
    REGISTER_METRIC,
    REGISTER_NO_STEPS,
)
from learnsim.energies import EnergyKind
from learnsim.grid import affine_to_tensor
from learnsim.likelihood import LikelihoodLearning, PrecisionPrior, parse_data_weight
from learnsim.metric import SimilarityMetric, build_metric
from learnsim.metric_checkpoint import check_metric_finite, load_learnt_metric
from learnsim.profiling import stage
from learnsim.ranges import check_register_settings
from learnsim.registration import FitResult, LevelSchedule, VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import displacement_to_mm, warp, warp_labels
from learnsim.transformation import TransformationKind

__all__ = ["load_metric", "load_network", "load_checkpoint", "checkpoint_settings", "register", "RegistrationOutput", "DEFAULTS",
           "REGISTER_DEFAULTS", "register_schedule", "resolve_device"]

# Read-only views of learnsim.defaults, for callers of the former tables (the paper's per-energy settings, and what
# learnsim.register uses when the caller says nothing)
DEFAULTS: dict[str, dict[str, float]] = {
    k.value: {"w_reg": p.w_reg, "lr": p.lr, "no_iters": p.no_iters} for k, p in PAPER.items()
}
REGISTER_DEFAULTS: dict[str, dict[str, Any]] = {
    k.value: {"levels": r.levels, "level_iters": r.level_iters, "level_lr": r.level_lr, "data_weight": r.data_weight}
    for k, r in REGISTER.items()
}


def register_schedule(
    energy: str,
    levels: int | None = None,
    no_iters: int | None = None,
    lr: float | None = None,
    level_iters: Any = None,
    level_lr: Any = None,
) -> LevelSchedule:
    """The q_v schedule :func:`register` runs for a metric's energy (``"ssd"`` or ``"lcc"``) and the caller's settings.

    * nothing given: :data:`REGISTER_DEFAULTS` (coarse-to-fine);
    * ``no_iters`` without ``levels`` / ``level_iters``: one level of ``no_iters`` steps (the paper's schedule);
    * ``levels`` without ``level_iters``: the default finest-level steps, doubled at each coarser level (``levels=1``
      with no ``no_iters``: the paper's :data:`DEFAULTS`);
    * ``lr`` sets every level's rate unless ``level_lr`` is given.
    """
    d, paper = REGISTER_DEFAULTS[EnergyKind(energy).value], DEFAULTS[EnergyKind(energy).value]
    if level_iters is not None:
        level_iters = [int(n) for n in level_iters]
        levels = len(level_iters) if levels is None else levels
    elif levels is None and no_iters is not None:
        levels = 1
    levels = int(d["levels"]) if levels is None else levels
    if level_iters is None:
        if levels == 1:
            level_iters = [int(paper["no_iters"] if no_iters is None else no_iters)]
        elif levels == d["levels"] and no_iters is None:
            level_iters = list(d["level_iters"])
        else:
            finest = int(d["level_iters"][-1] if no_iters is None else no_iters)
            level_iters = [finest * 2 ** (levels - 1 - i) for i in range(levels)]
    if level_lr is None:
        base = lr if lr is not None else (paper["lr"] if levels == 1 else None)
        # another number of levels: the default's finest rates at the finest levels, its coarsest rate above them
        rates = [float(x) for x in d["level_lr"]]
        level_lr = [float(base)] * levels if base is not None else (
            [rates[0]] * max(levels - len(rates), 0) + rates)[-levels:]
    return LevelSchedule.make(levels, level_iters[-1] if level_iters else 1, 1.0, level_iters, [float(x) for x in level_lr])


def resolve_device(device: str | torch.device = "auto", key: str = "device") -> torch.device:
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or CUDA on a
    machine without it, is refused with one line naming ``key``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{key} must be auto, cpu, cuda or cuda:N; got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key}={device}: no CUDA device is available here (use {key}=cpu or {key}=auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{key}={device}: only {count} CUDA device(s) here (cuda:0 .. cuda:{count - 1})")
    return dev


def load_metric(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu", verbose: bool = True) -> SimilarityMetric:
    """The learnt metric of a learnsim training checkpoint (:meth:`SimilarityMetric.from_checkpoint`), or of an
    original release CNN_SSD / CNN_LCC checkpoint (:mod:`learnsim.original_release`: rebuilt for learnsim's RAS
    grids, its one-line description printed to stderr unless ``verbose=False``); anything else is refused in one
    line naming the file."""
    from learnsim.original_release import ReleaseKind, load_release, read_release_file, release_kind

    try:
        kind = release_kind(read_release_file(ckpt, map_location))
    except ValueError:  # not a torch file at all: learnsim's own loader says so in its words
        kind = None
    if kind is ReleaseKind.NETWORK:
        raise ValueError(f"{ckpt}: an original release VoxelMorph network, not a learnt metric (use learnsim.load_network)")
    if kind is not None:
        _, metric, line = load_release(ckpt, map_location)
        if verbose:
            print(f"learnsim: {line}", file=sys.stderr)
        return metric  # type: ignore[return-value]
    return SimilarityMetric.from_checkpoint(ckpt, map_location)


def load_network(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu", verbose: bool = True) -> Any:
    """The :class:`~learnsim.voxelmorph.VoxelMorphNet` of a learnsim VoxelMorph checkpoint, or of an original release
    VoxelMorph file (a :class:`~learnsim.original_release.ReleasedVoxelMorphNet`: 2020 integration geometry, inputs on
    learnsim's RAS grids reoriented to its own axes), in eval mode; ``verbose`` prints one line saying what was
    loaded (stderr). Anything else is refused in one line naming the file.

    ``net(moving, fixed) -> (velocity, displacement)``, ``[B, 3, D, H, W]`` voxels; for NIfTI files in any orientation
    use :func:`learnsim.network_registration.register_with_network` (or ``learnsim-register --network``).
    """
    from learnsim.network_registration import open_network

    loaded = open_network(ckpt, map_location)
    if verbose:
        print(f"learnsim: {loaded.description}", file=sys.stderr)
    return loaded.net


def _check_not_constant(x: np.ndarray | Tensor, name: str, mask: np.ndarray | Tensor | None = None) -> None:
    """Refuse an image with no contrast (all zero, or constant inside ``mask``): nothing to register."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).reshape(x.shape) > 0
        if not bool(m.any()):
            raise ValueError(f"{name}: the fixed mask is empty (all zero); energies would be summed over nothing")
        x = x[m]
    if x.numel() == 0 or bool((x == x.reshape(-1)[0]).all()):
        value = float(x.reshape(-1)[0]) if x.numel() else 0.0
        what = "all zero" if value == 0 else f"constant ({value:g})"
        where = " inside the fixed mask" if mask is not None else ""
        raise ValueError(f"{name}: image is {what}{where}: nothing to register")


#: the keyword arguments of :func:`register` that :func:`_check_settings` checks
_CHECKED = ("no_iters", "no_steps", "int_downsize", "cps", "rank", "no_samples", "sobolev_s", "lr", "w_reg",
            "sigma_init", "sobolev_lambda", "histmatch", "sobolev", "transformation", "dims", "levels", "level_iters",
            "level_lr", "u_init", "seed", "data_weight")


def _check_settings(**kw: Any) -> None:
    """Refuse out-of-range settings, naming the key (``no_iters=-5`` would silently run zero iterations): the
    numbers against the shared table :mod:`learnsim.ranges`, the switches and the transformation here."""
    if isinstance(kw.get("dims"), int) and not isinstance(kw.get("dims"), bool):
        kw["dims"] = (kw["dims"],)
    check_register_settings(kw)
    rules = {
        "histmatch": (lambda v: isinstance(v, bool), "true or false"),
        "sobolev": (lambda v: isinstance(v, bool), "true or false"),
        "transformation": (lambda v: v in tuple(TransformationKind), " or ".join(f"'{k.value}'" for k in TransformationKind)),
    }
    for key, value in kw.items():
        if key in rules and not rules[key][0](value):
            raise ValueError(f"{key} must be {rules[key][1]}; got {value!r}")


@dataclass
class RegistrationOutput:
    """Result of :func:`register` on the fixed image's grid.

    Attributes:
        warped: ``[1, 1, D, H, W]`` moving image warped by the posterior-mean transformation.
        warped_seg: ``[1, 1, D, H, W]`` int64 warped segmentation (nearest), or None.
        disp: ``[1, 3, D, H, W]`` mean displacement in voxels.
        disp_mm: ``[1, 3, D, H, W]`` mean displacement in mm along the affine's world axes.
        samples: ``[N, 1, 3, D, H, W]`` displacements (voxels) drawn from q_v.
        uncertainty_mm: ``[1, 1, D, H, W]`` voxel-wise std of the displacement over the samples (mm; square root
            of the summed per-component variances), or None when fewer than 2 samples.
        affine: ``[4, 4]`` voxel -> mm of the grid.
        fit: the q_v fit (parameters, final loss, seconds).
        notes: what was done to the inputs (resampling etc.).
    """

    warped: Tensor
    warped_seg: Tensor | None
    disp: Tensor
    disp_mm: Tensor
    samples: Tensor
    uncertainty_mm: Tensor | None
    affine: np.ndarray
    fit: FitResult
    notes: list[str] = field(default_factory=list)


def _as_volume(x: Any, name: str):
    from learnsim.data.preprocess import Volume

    if isinstance(x, Volume):
        return x
    if isinstance(x, (str, os.PathLike)):
        vol = Volume.load(x)  # names the file if missing or unreadable
        if vol.data.ndim != 3:
            raise ValueError(f"{x}: {name} must be a 3D volume; got shape {vol.data.shape}")
        from learnsim.data.validate import affine_problem, voxel_problem

        problem = affine_problem(vol.affine) or voxel_problem(vol.data, "seg" if name == "moving_seg" else "image")
        if problem:
            raise ValueError(f"{x}: {name}: {problem}")
        return vol
    raise TypeError(f"{name}: expected a tensor, a Volume or a NIfTI path; got {type(x).__name__}")


def _check_tensor(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:
        x = x[None, None]
    if x.dim() != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"{name}: expected a 3D volume ([D, H, W] or [1, 1, D, H, W]); got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def register(
    fixed: Tensor | str | os.PathLike,
    moving: Tensor | str | os.PathLike,
    metric: str | SimilarityMetric = REGISTER_METRIC,
    *,
    moving_seg: Tensor | str | os.PathLike | None = None,
    fixed_mask: Tensor | str | os.PathLike | None = None,
    affine: np.ndarray | None = None,
    dims: int | tuple[int, int, int] | None = None,
    transformation: str = "svf",
    no_steps: int | str = REGISTER_NO_STEPS, int_downsize: int = REGISTER_INT_DOWNSIZE,
    cps: int = 2,
    no_iters: int | None = None, lr: float | None = None, w_reg: float | None = None,
    data_weight: float | str | None = None, likelihood: LikelihoodLearning | None = None,
    histmatch: bool = REGISTER_HISTMATCH,
    levels: int | None = None, level_iters: Any = None, level_lr: Any = None,
    sigma_init: float = 0.5, u_init: float = 0.1, rank: int = 1,
    sobolev: bool = True, sobolev_s: int = 3, sobolev_lambda: float = 0.5,
    no_samples: int = 5,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: Any = None,
    on_level: Any = None,
) -> RegistrationOutput:
    """Register ``moving`` to ``fixed`` by fitting q_v, and draw ``no_samples`` transformations from it.

    Args:
        fixed, moving: tensors (``[D, H, W]`` or ``[1, 1, D, H, W]``, already on one grid, intensities in [0, 1])
            or NIfTI paths, preprocessed as training data are: the fixed image defines the grid (its own, or a
            padded cube of ``dims`` voxels), the moving image (and its segmentation) are resampled into it
            **through their affines** (same world space) and min-max scaled; ``notes`` says what was done.
        metric: ``"lcc"`` (the default), ``"ssd"`` (baselines), a checkpoint path (``*.ckpt``: its learnt metric; an
            original release CNN_SSD / CNN_LCC file: :func:`load_metric`) or a :class:`~learnsim.metric.SimilarityMetric`.
        moving_seg: label map to warp (nearest). fixed_mask: energies are summed inside it (all voxels if None).
        affine: voxel -> mm of the tensors' grid (identity if None); ignored for paths. transformation: ``"svf"``
            or ``"svffd"`` (B-spline SVF with ``cps`` voxels between control points).
        no_steps, int_downsize: squarings (or ``"auto"``) and integration grid factor (:mod:`~learnsim.fast_integration`).
        levels, level_iters, level_lr, no_iters, lr: the q_v schedule (lists coarsest level first), resolved by
            :func:`register_schedule`: nothing given is :data:`learnsim.defaults.REGISTER` (3 levels; LCC 100/50/15, SSD 200/100/50
            steps); ``no_iters`` alone is one level of that many steps (the paper's: 1024 SSD / 1344 LCC); ``lr``
            sets every level's learning rate.
        w_reg: defaults to the paper's for the metric's energy (:data:`learnsim.defaults.PAPER`: SSD 1.8, LCC 2.8).
        data_weight: the likelihood precision (``metric.energy.weight``); None: :data:`learnsim.defaults.REGISTER`'s;
            ``"auto"``: learnt in the fit by variational Bayes (:mod:`learnsim.likelihood`), reported in
            ``output.fit.precision``. likelihood: how (:class:`~learnsim.likelihood.LikelihoodLearning`).
        histmatch: match the moving image's histogram to the fixed image's first (:func:`~learnsim.data.preprocess.match_histogram`).
        progress, on_level: ``progress(iteration, loss [1])`` every few q_v iterations (counted across levels),
            ``on_level(level, no_levels, shape, no_iters)`` before each level.
    """
    _check_settings(**{k: v for k, v in locals().items() if k in _CHECKED})  # before anything runs
    kind, dev = TransformationKind(transformation), resolve_device(device)
    metric, likelihood = _resolve_likelihood(metric, data_weight, likelihood)
    schedule = register_schedule(metric.energy_kind, levels, no_iters, lr, level_iters, level_lr)
    if schedule.levels > 1 and kind is not TransformationKind.SVF:
        raise ValueError(f"levels={schedule.levels} needs transformation='svf' (the pyramid transfers dense velocities)")
    tensors = isinstance(fixed, Tensor) and isinstance(moving, Tensor)
    with stage("loading"):
        inputs = (_tensor_inputs(fixed, moving, moving_seg, fixed_mask, affine) if tensors
                  else _file_inputs(fixed, moving, moving_seg, fixed_mask, dims))
    if histmatch:
        with stage("histogram matching"):
            inputs.match_histogram()
    torch.manual_seed(seed)
    reg = VariationalRegistration.paper(
        metric.to(dev), w_reg=w_reg, transformation=kind.build(no_steps, cps, int_downsize),
        sobolev=SobolevSmoother(sobolev, sobolev_s, sobolev_lambda).to(dev),
        no_iters=schedule.iters[-1], lr=schedule.lr[-1], sigma_init=sigma_init, u_init=u_init, rank=rank,
        uniform_noise=0.0, levels=schedule.levels, level_iters=schedule.iters, level_lr=schedule.lr,
        likelihood=likelihood,
    )
    moving_t, mask_t = inputs.moving.to(dev), (inputs.mask.to(dev) if inputs.mask is not None else None)
    fit = reg.fit_levels(inputs.fixed.to(dev), moving_t, mask_t, progress=progress, log_every=4 if progress else 0, on_level=on_level)
    with stage("output samples"):
        out = _outputs(reg, fit, moving_t, inputs.seg, inputs.affine, no_samples, inputs.notes)
    back = inputs.back_to_fixed
    if back is None or np.allclose(back.affine, inputs.affine, atol=1e-6):
        return out
    with stage("reorientation"):
        return _reorient(out, back)


def _resolve_likelihood(metric: str | SimilarityMetric, data_weight: Any,
                        likelihood: LikelihoodLearning | None) -> tuple[SimilarityMetric, LikelihoodLearning | None]:
    """The metric and, for ``data_weight="auto"``, how its precision is learnt: a baseline by name starts from the
    paper's precision 1, a learnt metric (or the caller's) from its own weight (the prior's mean)."""
    data_weight = parse_data_weight(data_weight)
    if data_weight != "auto":
        return _resolve_metric(metric, data_weight), None
    by_name = isinstance(metric, str) and not metric.endswith(".ckpt") and not os.path.isfile(metric)
    metric = _resolve_metric(metric, 1.0 if by_name else None)
    return metric, likelihood or LikelihoodLearning(PrecisionPrior(mean=float(metric.energy.weight)))


def _resolve_metric(metric: str | SimilarityMetric, data_weight: float | None) -> SimilarityMetric:
    """The metric :func:`register` fits with: a baseline by name, a checkpoint's (``*.ckpt``), or the caller's,
    with the likelihood precision ``data_weight`` (default: :data:`learnsim.defaults.REGISTER`'s for a baseline)
    set on a copy (the caller's metric is never changed)."""
    if isinstance(metric, str) and metric.endswith(".ckpt"):
        metric = load_learnt_metric(metric, "metric")  # refuses a VoxelMorph checkpoint and NaN weights
    elif isinstance(metric, str) and os.path.isfile(metric):  # an original release CNN_SSD / CNN_LCC file
        metric = load_metric(metric)
    if isinstance(metric, str):
        metric = build_metric(metric)
        if data_weight is None:
            data_weight = REGISTER[metric.energy_kind].data_weight
    else:
        check_metric_finite(metric, "metric")
    # data_weight: a number here (its range checked by learnsim.ranges); a string such as "auto" is resolved here
    if data_weight is not None:
        if isinstance(data_weight, str) or not data_weight > 0:
            raise ValueError(f"data_weight must be a number > 0; got {data_weight!r}")
        metric = copy.deepcopy(metric)  # never change the caller's metric
        metric.set_weight_(float(data_weight))
    return metric


@dataclass
class _Inputs:
    """The pair on the working grid: ``[1, 1, D, H, W]`` tensors (CPU), its affine, and how to map back."""

    fixed: Tensor
    moving: Tensor
    seg: Tensor | None
    mask: Tensor | None
    affine: np.ndarray
    back_to_fixed: Any = None  # the fixed image's own Grid when the outputs must go back to it
    notes: list[str] = field(default_factory=list)

    def match_histogram(self) -> None:
        """Match the moving image's histogram (its non-zero voxels) to the fixed image's (inside the mask)."""
        from learnsim.data.preprocess import match_histogram

        ref_mask = self.mask[0, 0].cpu().numpy() if self.mask is not None else None
        matched = match_histogram(self.moving[0, 0].cpu().numpy(), None, self.fixed[0, 0].cpu().numpy(), ref_mask)
        self.moving = torch.from_numpy(matched)[None, None]
        self.notes.append("moving histogram matched to the fixed image's")


def _tensor_inputs(fixed: Tensor, moving: Tensor, moving_seg: Any, fixed_mask: Any, affine: Any) -> _Inputs:
    """Tensors already on one grid: checked, not resampled (``affine`` None: identity)."""
    fixed_t = _check_tensor(fixed.float(), "fixed")
    moving_t = _check_tensor(moving.float(), "moving")
    if fixed_t.shape != moving_t.shape:
        raise ValueError(f"moving: shape {tuple(moving_t.shape[2:])} != fixed shape {tuple(fixed_t.shape[2:])}; pass NIfTI paths to resample through the affines")
    seg_t = mask_t = None
    if moving_seg is not None:
        seg_t = _check_tensor(torch.as_tensor(moving_seg).float(), "moving_seg").long()
        if seg_t.shape != fixed_t.shape:
            raise ValueError(f"moving_seg: shape {tuple(seg_t.shape[2:])} != image shape {tuple(fixed_t.shape[2:])}")
    if fixed_mask is not None:
        mask_t = _check_tensor(torch.as_tensor(fixed_mask).float(), "fixed_mask")
    _check_not_constant(moving_t, "moving")
    _check_not_constant(fixed_t, "fixed", mask_t)
    if seg_t is not None and moving_seg is not None:
        seg_in = torch.as_tensor(moving_seg).double()
        if not bool((seg_in == seg_in.round()).all()):
            raise ValueError("moving_seg: label map holds non-integer values; label ids must be integers")
    from learnsim.data.validate import affine_problem

    grid_affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if grid_affine.shape != (4, 4) or affine_problem(grid_affine):
        raise ValueError(f"affine: expected a 4x4 voxel -> mm matrix, finite and non-singular; got {affine!r}")
    return _Inputs(fixed_t, moving_t, seg_t, mask_t, grid_affine)


def _file_inputs(fixed: Any, moving: Any, moving_seg: Any, fixed_mask: Any, dims: Any) -> _Inputs:
    """NIfTI paths (or Volumes): checked, then preprocessed onto the working grid as training data are."""
    from learnsim.data.preprocess import Grid, canonical_grid, preprocess, target_grid

    fixed_v = _as_volume(fixed, "fixed")
    moving_v = _as_volume(moving, "moving")
    seg_v = _as_volume(moving_seg, "moving_seg") if moving_seg is not None else None
    mask_v = _as_volume(fixed_mask, "fixed_mask") if fixed_mask is not None else None
    _check_volumes(fixed_v, moving_v, seg_v, mask_v, fixed, moving, moving_seg, fixed_mask)
    grid: Grid = target_grid(fixed_v.data.shape, fixed_v.affine, dims) if dims else canonical_grid(fixed_v.data.shape, fixed_v.affine)
    pf = preprocess(fixed_v, grid, mask=mask_v)
    pm = preprocess(moving_v, grid, seg=seg_v, apply_mask=False)
    fixed_t = torch.from_numpy(pf.image)[None, None]
    seg_t = torch.from_numpy(pm.seg.astype(np.int64))[None, None] if pm.seg is not None else None
    mask_t = torch.from_numpy(pf.mask.astype(np.float32))[None, None] if pf.mask is not None else None
    _check_not_constant(fixed_t, f"{fixed} (on the working grid)", mask_t)
    if not bool(np.any(pm.image)):  # resampled through its affine, the moving image missed the fixed grid
        raise ValueError(f"{moving}: the moving image does not overlap the fixed image {fixed} in world space (all "
                         "zero on the working grid); check its affine")
    # without dims the outputs go back to the fixed image's own voxel order (an LPS or permuted atlas keeps its
    # affine); the registration itself runs on the RAS grid, as in training
    back = None if dims else Grid(tuple(fixed_v.data.shape), fixed_v.affine)
    return _Inputs(fixed_t, torch.from_numpy(pm.image)[None, None], seg_t, mask_t, grid.affine, back,
                   pf.notes + pm.notes)


def _check_volumes(fixed_v, moving_v, seg_v, mask_v, fixed, moving, moving_seg, fixed_mask) -> None:
    """Refuse a label map off its image's grid, an empty label map or mask, and images without contrast."""
    if seg_v is not None and (seg_v.data.shape != moving_v.data.shape or not np.allclose(seg_v.affine, moving_v.affine, atol=1e-3)):
        raise ValueError(
            f"{moving_seg}: moving_seg grid (shape {seg_v.data.shape}) does not match the moving image {moving} "
            f"(shape {moving_v.data.shape}); a label map must be on its image's grid"
        )
    if seg_v is not None and not np.any(seg_v.data):
        raise ValueError(f"{moving_seg}: moving_seg label map is empty (all background)")
    _check_not_constant(fixed_v.data, str(fixed))
    _check_not_constant(moving_v.data, str(moving))
    if mask_v is not None and not np.any(mask_v.data > 0):
        raise ValueError(f"{fixed_mask}: the fixed mask is empty (all zero); energies would be summed over nothing")


def _outputs(reg: VariationalRegistration, fit: FitResult, moving: Tensor, seg: Tensor | None,
             grid_affine: np.ndarray, no_samples: int, notes: list[str]) -> RegistrationOutput:
    """Mean transformation, samples, warped image / labels, mm displacement and uncertainty of a fit (on the CPU)."""
    shape = moving.shape[2:]
    disp = reg.mean_displacement(fit.params, shape)
    samples = reg.sample_displacements(fit.params, shape, max(no_samples, 0)) if no_samples > 0 else disp[None]
    aff_t = affine_to_tensor(grid_affine, dtype=torch.float32)
    with torch.no_grad():
        from learnsim.evaluation.uncertainty import (
            displacement_std_mm,  # scipy/pandas: only once there are outputs
        )

        warped = warp(moving, disp)
        warped_seg = warp_labels(seg.to(moving.device), disp) if seg is not None else None
        disp_mm = displacement_to_mm(disp, aff_t)
        unc = displacement_std_mm(samples, aff_t) if samples.shape[0] >= 2 else None
    return RegistrationOutput(
        warped.cpu(), None if warped_seg is None else warped_seg.cpu(), disp.cpu(), disp_mm.cpu(), samples.cpu(),
        None if unc is None else unc.cpu(), grid_affine, fit, notes,
    )


def _reorient(out: RegistrationOutput, target) -> RegistrationOutput:
    """Bring every output of ``out`` (on a grid that is a permutation/flip of ``target``'s voxels) onto ``target``.

    Exact (no interpolation): voxel ``i`` of ``target`` is voxel ``j = P i + t`` of the working grid, with ``P`` a
    signed permutation. Scalar maps are gathered; voxel displacements (``disp``, ``samples``) also have their
    components mapped by ``P^-1``; mm displacements are in world axes and only gathered.
    """
    src = np.asarray(out.affine, dtype=np.float64)
    m = np.linalg.solve(src, np.asarray(target.affine, dtype=np.float64))  # target voxel -> working-grid voxel
    p = np.rint(m[:3, :3]).astype(np.int64)
    t = np.rint(m[:3, 3]).astype(np.int64)
    if not (np.allclose(m[:3, :3], p, atol=1e-4) and np.allclose(m[:3, 3], t, atol=1e-4)):
        raise AssertionError("learnsim: the working grid is not a reorientation of the fixed image's grid")
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij")).reshape(3, -1)
    j = torch.from_numpy(p @ idx + t[:, None])
    src_shape = out.warped.shape[-3:]
    flat = (j[0] * src_shape[1] + j[1]) * src_shape[2] + j[2]
    to_target = torch.from_numpy(np.linalg.inv(p)).to(torch.float32)  # working-grid voxel vector -> target's

    def gather(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return x.reshape(*x.shape[:-3], -1)[..., flat].reshape(*x.shape[:-3], *target.shape)

    def vectors(x: Tensor) -> Tensor:  # [..., 3, D, H, W] voxel displacements
        g = gather(x)
        return torch.einsum("ij,...jdhw->...idhw", to_target.to(g.dtype), g)

    return RegistrationOutput(
        gather(out.warped), gather(out.warped_seg), vectors(out.disp), gather(out.disp_mm), vectors(out.samples),
        gather(out.uncertainty_mm), np.asarray(target.affine, dtype=np.float64), out.fit,
        [*out.notes, "outputs put back into the fixed image's voxel order and affine"],
    )
