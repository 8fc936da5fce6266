"""The public one-call API: :func:`register` a moving image to a fixed one, :func:`load_metric` from a checkpoint."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnsim.energies import RegLossL2
from learnsim.evaluation.uncertainty import displacement_std_mm
from learnsim.grid import affine_to_tensor
from learnsim.metric import SimilarityMetric, build_metric
from learnsim.registration import FitResult, LevelSchedule, VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import displacement_to_mm, warp, warp_labels
from learnsim.transformation import SVF, SVFFD

__all__ = ["load_metric", "load_checkpoint", "checkpoint_settings", "register", "RegistrationOutput", "DEFAULTS",
           "REGISTER_DEFAULTS", "register_schedule", "resolve_device"]

# The original code's per-metric settings (SPEC section 3-4)
DEFAULTS: dict[str, dict[str, float]] = {
    "ssd": {"w_reg": 1.8, "lr": 0.01, "no_iters": 1024},
    "lcc": {"w_reg": 2.8, "lr": 0.02, "no_iters": 1344},
}

# What learnsim.register / learnsim-register use when the caller says nothing (chosen by measurement on the demo
# test pairs: README, "Defaults of learnsim-register"). ``data_weight`` applies to the baselines only (a learnt
# metric keeps its own weight); ``level_iters`` / ``level_lr`` are coarsest level first.
REGISTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "ssd": {"levels": 3, "level_iters": (200, 100, 50), "level_lr": (0.05, 0.05, 0.05), "data_weight": 100.0},
    "lcc": {"levels": 3, "level_iters": (200, 100, 50), "level_lr": (0.05, 0.05, 0.05), "data_weight": 10.0},
}
REGISTER_HISTMATCH = True


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
    d, paper = REGISTER_DEFAULTS[energy], DEFAULTS[energy]
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
        level_lr = [float(base)] * levels if base is not None else (
            list(d["level_lr"]) if levels == d["levels"] else [float(d["level_lr"][-1])] * levels)
    return LevelSchedule.make(levels, level_iters[-1] if level_iters else 1, 1.0, level_iters, [float(x) for x in level_lr])


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a learnsim checkpoint safely: ``torch.load(weights_only=True)`` (no code from the file is run).

    Raises:
        FileNotFoundError: naming the checkpoint if it does not exist.
        ValueError: naming the checkpoint if it is not a torch checkpoint holding only tensors and plain Python
            values (a text file, a foreign pickle, a truncated file), or has no ``state_dict``.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...: the user needs the file name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: not a learnsim checkpoint (cannot be read as a torch checkpoint of tensors and plain values: {first})"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{path}: not a learnsim checkpoint (no state_dict)")
    return state


def checkpoint_settings(state: dict) -> dict[str, Any]:
    """The registration settings a checkpoint's training run used, as :func:`register` keywords.

    ``histmatch`` (from ``data.intensity``) and ``no_steps`` (from ``transformation.no_steps``), where the
    checkpoint's stored run config says; an empty dict for checkpoints without one.
    """
    cfg = state.get("learnsim_config") or {}
    out: dict[str, Any] = {}
    intensity = (cfg.get("data") or {}).get("intensity")
    if intensity in ("minmax", "histmatch"):
        out["histmatch"] = intensity == "histmatch"
    no_steps = (cfg.get("transformation") or {}).get("no_steps")
    if isinstance(no_steps, int):
        out["no_steps"] = no_steps
    return out


def load_metric(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu") -> SimilarityMetric:
    """Rebuild the learnt metric of a learnsim training checkpoint (no Hydra needed).

    The file is read with ``weights_only=True`` (:func:`load_checkpoint`).

    Raises:
        FileNotFoundError: naming the checkpoint if it does not exist.
        ValueError: naming the checkpoint if it holds no learnsim metric.
    """
    path = Path(ckpt)
    state = load_checkpoint(path, map_location)
    spec = (state.get("hyper_parameters") or {}).get("metric_spec")
    if spec is None:
        raise ValueError(f"{path}: not a learnsim checkpoint (no hyper_parameters.metric_spec)")
    spec = dict(spec)
    metric = build_metric(spec.pop("kind"), **{k: v for k, v in spec.items() if k != "learnable"})
    prefix = "metric."
    weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = metric.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if not m.endswith("window")]:
        raise ValueError(f"{path}: metric weights do not match its spec (missing {missing}, unexpected {unexpected})")
    return metric.eval()


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


def _check_settings(**kw: Any) -> None:
    """Refuse out-of-range settings, naming the key (``no_iters=-5`` would silently run zero iterations)."""
    rules = {
        "no_iters": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1"),
        "no_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        "cps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        "rank": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        "no_samples": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        "sobolev_s": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        "lr": (lambda v: v is None or (isinstance(v, (int, float)) and v > 0), "a number > 0"),
        "w_reg": (lambda v: v is None or (isinstance(v, (int, float)) and v >= 0), "a number >= 0"),
        "sigma_init": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "sobolev_lambda": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
        "histmatch": (lambda v: isinstance(v, bool), "true or false"),
        "sobolev": (lambda v: isinstance(v, bool), "true or false"),
        "transformation": (lambda v: v in ("svf", "svffd"), "'svf' or 'svffd'"),
    }
    for key, value in kw.items():
        ok, expected = rules[key]
        if isinstance(value, bool) and expected.startswith(("an integer", "a number")) or not ok(value):
            raise ValueError(f"{key} must be {expected}; got {value!r}")


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
        if np.issubdtype(vol.data.dtype, np.floating) and not np.isfinite(vol.data).all():
            raise ValueError(f"{x}: {name} contains NaN or inf")
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
    metric: str | SimilarityMetric = "ssd",
    *,
    moving_seg: Tensor | str | os.PathLike | None = None,
    fixed_mask: Tensor | str | os.PathLike | None = None,
    affine: np.ndarray | None = None,
    dims: int | tuple[int, int, int] | None = None,
    transformation: str = "svf",
    no_steps: int = 12,
    cps: int = 2,
    no_iters: int | None = None,
    lr: float | None = None,
    w_reg: float | None = None,
    data_weight: float | None = None,
    histmatch: bool = REGISTER_HISTMATCH,
    levels: int | None = None,
    level_iters: Any = None,
    level_lr: Any = None,
    sigma_init: float = 0.5,
    u_init: float = 0.1,
    rank: int = 1,
    sobolev: bool = True,
    sobolev_s: int = 3,
    sobolev_lambda: float = 0.5,
    no_samples: int = 5,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: Any = None,
    on_level: Any = None,
) -> RegistrationOutput:
    """Register ``moving`` to ``fixed`` by fitting q_v, and draw ``no_samples`` transformations from it.

    Args:
        fixed, moving: tensors (``[D, H, W]`` or ``[1, 1, D, H, W]``, already on one grid, intensities in [0, 1])
            or NIfTI paths. Paths are preprocessed with the same code as training data: the fixed image defines
            the grid (its own grid, or a padded cube of ``dims`` voxels), the moving image (and its segmentation)
            are resampled into it **through their affines** (same world space, e.g. MNI-aligned) and min-max
            scaled; ``notes`` says what was resampled.
        metric: ``"ssd"``, ``"lcc"`` (baselines), a checkpoint path (``*.ckpt``: its learnt metric) or a
            :class:`~learnsim.metric.SimilarityMetric`.
        moving_seg: label map to warp (nearest).
        fixed_mask: energies are summed inside it (all voxels if None).
        affine: voxel -> mm of the tensors' grid (identity if None); ignored for paths.
        transformation: ``"svf"`` or ``"svffd"`` (B-spline SVF with ``cps`` voxels between control points).
        levels, level_iters, level_lr: the coarse-to-fine schedule (:meth:`VariationalRegistration.fit_levels`;
            lists coarsest level first); resolved by :func:`register_schedule`: nothing given is
            :data:`REGISTER_DEFAULTS` (3 levels, 200/100/50 steps); ``no_iters`` alone is one level of that many
            steps (the paper's schedule with ``no_iters=1024`` / ``1344``).
        no_iters, lr: see above; ``lr`` sets every level's learning rate.
        w_reg: defaults to the original setting of the metric's energy (SSD 1.8, LCC 2.8).
        data_weight: the likelihood precision multiplying the data energy (``metric.energy.weight``). None: for the
            ``"ssd"`` / ``"lcc"`` baselines :data:`REGISTER_DEFAULTS` (SSD 100, LCC 10: README, "Defaults of
            learnsim-register"), a learnt metric keeps its own.
        histmatch: match the moving image's histogram (inside its non-zero voxels) to the fixed image's (inside
            ``fixed_mask``) before registering (:func:`learnsim.data.preprocess.match_histogram`); on by default.
        progress: ``progress(iteration, loss [1])`` every few q_v iterations (counted across levels).
        on_level: ``on_level(level, no_levels, shape, no_iters)`` before each level.
    """
    _check_settings(no_iters=no_iters, no_steps=no_steps, cps=cps, rank=rank, no_samples=no_samples, sobolev_s=sobolev_s,
                    lr=lr, w_reg=w_reg, sigma_init=sigma_init, sobolev_lambda=sobolev_lambda, histmatch=histmatch,
                    sobolev=sobolev, transformation=transformation)
    if dims is not None and not all(int(d) >= 1 for d in ((dims,) if isinstance(dims, int) else dims)):
        raise ValueError(f"dims must be positive; got {dims!r}")
    dev = resolve_device(device)
    notes: list[str] = []
    if isinstance(metric, str) and metric.endswith(".ckpt"):
        metric = load_metric(metric)
    if isinstance(metric, str):
        metric = build_metric(metric)
        if data_weight is None:
            data_weight = float(REGISTER_DEFAULTS["lcc" if "lcc" in metric.spec["kind"] else "ssd"]["data_weight"])
    if data_weight is not None:
        if not data_weight > 0:
            raise ValueError(f"data_weight must be > 0; got {data_weight}")
        metric = copy.deepcopy(metric)  # never change the caller's metric
        metric.energy.weight = float(data_weight)
        metric.spec["weight"] = float(data_weight)
    energy = "lcc" if "lcc" in metric.spec["kind"] else "ssd"
    defaults = DEFAULTS[energy]
    schedule = register_schedule(energy, levels, no_iters, lr, level_iters, level_lr)
    if schedule.levels > 1 and transformation != "svf":
        raise ValueError(f"levels={schedule.levels} needs transformation='svf' (the pyramid transfers dense velocities)")

    seg_t = mask_t = None
    if isinstance(fixed, Tensor) and isinstance(moving, Tensor):
        fixed_t = _check_tensor(fixed.float(), "fixed")
        moving_t = _check_tensor(moving.float(), "moving")
        if fixed_t.shape != moving_t.shape:
            raise ValueError(f"moving: shape {tuple(moving_t.shape[2:])} != fixed shape {tuple(fixed_t.shape[2:])}; pass NIfTI paths to resample through the affines")
        if moving_seg is not None:
            seg_t = _check_tensor(torch.as_tensor(moving_seg).float(), "moving_seg").long()
            if seg_t.shape != fixed_t.shape:
                raise ValueError(f"moving_seg: shape {tuple(seg_t.shape[2:])} != image shape {tuple(fixed_t.shape[2:])}")
        if fixed_mask is not None:
            mask_t = _check_tensor(torch.as_tensor(fixed_mask).float(), "fixed_mask")
        grid_affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        _check_not_constant(moving_t, "moving")
        _check_not_constant(fixed_t, "fixed", mask_t)
        back_to_fixed = None
    else:
        from learnsim.data.preprocess import Grid, canonical_grid, preprocess, target_grid

        fixed_v = _as_volume(fixed, "fixed")
        moving_v = _as_volume(moving, "moving")
        seg_v = _as_volume(moving_seg, "moving_seg") if moving_seg is not None else None
        if seg_v is not None and (seg_v.data.shape != moving_v.data.shape or not np.allclose(seg_v.affine, moving_v.affine, atol=1e-3)):
            raise ValueError(
                f"{moving_seg}: moving_seg grid (shape {seg_v.data.shape}) does not match the moving image {moving} "
                f"(shape {moving_v.data.shape}); a label map must be on its image's grid"
            )
        if seg_v is not None and not np.any(seg_v.data):
            raise ValueError(f"{moving_seg}: moving_seg label map is empty (all background)")
        mask_v = _as_volume(fixed_mask, "fixed_mask") if fixed_mask is not None else None
        _check_not_constant(fixed_v.data, str(fixed))
        _check_not_constant(moving_v.data, str(moving))
        if mask_v is not None and not np.any(mask_v.data > 0):
            raise ValueError(f"{fixed_mask}: the fixed mask is empty (all zero); energies would be summed over nothing")
        grid: Grid = target_grid(fixed_v.data.shape, fixed_v.affine, dims) if dims else canonical_grid(fixed_v.data.shape, fixed_v.affine)
        # without dims the outputs go back to the fixed image's own voxel order (an LPS or permuted atlas keeps its
        # affine); the registration itself runs on the RAS grid, as in training
        back_to_fixed = None if dims else Grid(tuple(fixed_v.data.shape), fixed_v.affine)
        pf = preprocess(fixed_v, grid, mask=mask_v)
        pm = preprocess(moving_v, grid, seg=seg_v, apply_mask=False)
        notes += pf.notes + pm.notes
        fixed_t = torch.from_numpy(pf.image)[None, None]
        moving_t = torch.from_numpy(pm.image)[None, None]
        if pm.seg is not None:
            seg_t = torch.from_numpy(pm.seg.astype(np.int64))[None, None]
        if pf.mask is not None:
            mask_t = torch.from_numpy(pf.mask.astype(np.float32))[None, None]
        _check_not_constant(fixed_t, f"{fixed} (on the working grid)", mask_t)
        grid_affine = grid.affine

    if histmatch:
        from learnsim.data.preprocess import match_histogram

        ref_mask = mask_t[0, 0].cpu().numpy() if mask_t is not None else None
        matched = match_histogram(moving_t[0, 0].cpu().numpy(), None, fixed_t[0, 0].cpu().numpy(), ref_mask)
        moving_t = torch.from_numpy(matched)[None, None]
        notes.append("moving histogram matched to the fixed image's")

    torch.manual_seed(seed)
    tr = SVFFD(no_steps, cps) if transformation == "svffd" else SVF(no_steps)
    reg = VariationalRegistration(
        metric.to(dev),
        tr,
        RegLossL2(defaults["w_reg"] if w_reg is None else w_reg),
        SobolevSmoother(sobolev, sobolev_s, sobolev_lambda).to(dev),
        no_iters=schedule.iters[-1],
        lr=schedule.lr[-1],
        sigma_init=sigma_init,
        u_init=u_init,
        rank=rank,
        uniform_noise=0.0,
        levels=schedule.levels,
        level_iters=schedule.iters,
        level_lr=schedule.lr,
    )
    fixed_t, moving_t = fixed_t.to(dev), moving_t.to(dev)
    mask_t = mask_t.to(dev) if mask_t is not None else None
    fit = reg.fit_levels(fixed_t, moving_t, mask_t, progress=progress, log_every=4 if progress else 0, on_level=on_level)
    shape = fixed_t.shape[2:]
    disp = reg.mean_displacement(fit.params, shape)
    samples = reg.sample_displacements(fit.params, shape, max(no_samples, 0)) if no_samples > 0 else disp[None]
    aff_t = affine_to_tensor(grid_affine, dtype=torch.float32)
    with torch.no_grad():
        warped = warp(moving_t, disp)
        warped_seg = warp_labels(seg_t.to(dev), disp) if seg_t is not None else None
        disp_mm = displacement_to_mm(disp, aff_t)
        unc = displacement_std_mm(samples, aff_t) if samples.shape[0] >= 2 else None
    out = RegistrationOutput(
        warped.cpu(), None if warped_seg is None else warped_seg.cpu(), disp.cpu(), disp_mm.cpu(), samples.cpu(),
        None if unc is None else unc.cpu(), grid_affine, fit, notes,
    )
    if back_to_fixed is not None and not np.allclose(back_to_fixed.affine, grid_affine, atol=1e-6):
        out = _reorient(out, back_to_fixed)
    return out


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
