"""Affine registration of a source volume to the atlas: the demo's stand-in for the "affine to MNI" step.

:func:`fit_affine` finds the 12-parameter world->world affine ``W`` that brings a moving volume onto a fixed one
(``moving.affine <- W @ moving.affine``), by maximising the normalised cross-correlation of the two images:

* initialisation from moments: the centroids of the foregrounds (a given mask, or the voxels above 10 % of the
  99th intensity percentile, holes filled) matched, and an isotropic scale from the ratio of their volumes;
  the orientation is the one of the headers (every source's header is right-handed and labelled, so no axis search);
* multi-resolution: the fixed image resampled onto cubes of ``levels`` voxels around the fixed volume (the
  working grid's construction, :func:`learnsim.data.preprocess.target_grid`), both images Gaussian-smoothed to the
  level's voxel size first; Adam on the linear part and the translation (about the fixed centroid), in float64 on
  one thread, so the result is the same on every machine with the same torch (rounded to 1e-6 mm and 1e-9).

:func:`correlation` is the check: the Pearson correlation of two images over a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from learnsim.data.preprocess import sample_at_voxels, source_voxel_coords, target_grid

__all__ = ["AffineFit", "fit_affine", "correlation", "foreground", "moments_init"]


@dataclass(frozen=True)
class AffineFit:
    """Result of :func:`fit_affine`.

    Attributes:
        world: 4x4 world->world affine (mm) taking the moving volume's world onto the fixed one's
            (new moving voxel->mm affine: ``world @ moving_affine``).
        ncc_init: NCC on the finest level after the moments initialisation.
        ncc: NCC on the finest level after the fit.
    """

    world: np.ndarray
    ncc_init: float
    ncc: float


def foreground(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``mask > 0`` if given, else the voxels above 10 % of the 99th percentile of ``image``, holes filled. bool."""
    if mask is not None:
        return np.asarray(mask) > 0
    x = np.asarray(image, dtype=np.float32)
    hi = float(np.percentile(x, 99))
    return ndimage.binary_fill_holes(x > 0.1 * hi)


def _world_moments(fg: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    ijk = np.argwhere(fg)
    if len(ijk) == 0:
        raise ValueError("fit_affine: empty foreground (no voxel above the threshold / in the mask)")
    centroid = ijk.mean(0) @ affine[:3, :3].T + affine[:3, 3]
    volume = len(ijk) * abs(np.linalg.det(affine[:3, :3]))
    return centroid, float(volume)


def moments_init(
    moving_fg: np.ndarray,
    moving_affine: np.ndarray,
    fixed_fg: np.ndarray,
    fixed_affine: np.ndarray,
    scale: bool = True,
) -> np.ndarray:
    """4x4 world->world affine: the moving foreground's centroid onto the fixed one's; with ``scale``, an isotropic
    scale by the cube root of their volume ratio (clipped to [0.8, 1.25]; without, 1: heads with and without
    neck differ in volume more than in size)."""
    c_m, v_m = _world_moments(moving_fg, moving_affine)
    c_f, v_f = _world_moments(fixed_fg, fixed_affine)
    s = float(np.clip((v_f / v_m) ** (1.0 / 3.0), 0.8, 1.25)) if scale else 1.0
    out = np.eye(4)
    out[:3, :3] *= s
    out[:3, 3] = c_f - s * c_m
    return out


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two same-shape images over ``mask > 0`` (all voxels without a mask)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sel = (np.asarray(mask) > 0) if mask is not None else np.ones(a.shape, bool)
    x, y = a[sel] - a[sel].mean(), b[sel] - b[sel].mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def _ncc(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = w.sum()
    mx, my = (w * x).sum() / n, (w * y).sum() / n
    dx, dy = x - mx, y - my
    return (w * dx * dy).sum() / torch.sqrt((w * dx * dx).sum() * (w * dy * dy).sum() + 1e-12)


def _smoothed(image: np.ndarray, affine: np.ndarray, sigma_mm: float) -> torch.Tensor:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    sm = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), sigma_mm / spacing, mode="constant")
    return torch.from_numpy(sm)[None, None]


@dataclass
class _Level:
    fixed: torch.Tensor  # [1, 1, D, H, W] fixed image on the level grid
    weight: torch.Tensor  # [1, 1, D, H, W] where the NCC is computed
    moving: torch.Tensor  # [1, 1, d, h, w] smoothed moving image (its own grid)
    world: torch.Tensor  # [3, D*H*W] world coordinates (mm) of the level grid's voxels


def _level(
    moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray, fixed_affine: np.ndarray,
    region: np.ndarray, dims: int,
) -> _Level:
    grid = target_grid(fixed.shape, fixed_affine, dims)
    sigma = 0.5 * float(grid.spacing.mean())
    coords = source_voxel_coords(grid, fixed_affine, dtype=torch.float64)
    f = sample_at_voxels(_smoothed(fixed, fixed_affine, sigma), coords)
    fg = sample_at_voxels(torch.from_numpy(region.astype(np.float64))[None, None], coords)
    # the NCC over the region grown by two level voxels: the outline of the head/brain counts
    weight = torch.from_numpy(ndimage.binary_dilation(fg[0, 0].numpy() > 0.5, iterations=2).astype(np.float64))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), 0).reshape(3, -1)
    world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]
    return _Level(f, weight[None, None], _smoothed(moving, moving_affine, sigma), torch.from_numpy(world))


def _moving_on_level(
    lv: _Level, inv_moving_affine: torch.Tensor, lin: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """The moving image sampled at ``T(y) = lin @ y + shift`` (fixed world -> moving world) for the level's ``y``."""
    src_world = lin @ lv.world + shift[:, None]
    ijk = inv_moving_affine[:3, :3] @ src_world + inv_moving_affine[:3, 3:4]
    coords = ijk.reshape(1, 3, *lv.fixed.shape[2:])
    return sample_at_voxels(lv.moving, coords)


def fit_affine(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving_mask: np.ndarray | None = None,
    fixed_mask: np.ndarray | None = None,
    region: np.ndarray | None = None,
    levels: Sequence[int] = (24, 48),
    iters: Sequence[int] = (150, 80),
    lr: float = 0.01,
) -> AffineFit:
    """Affine registration of ``moving`` to ``fixed`` by NCC, multi-resolution, initialised from moments.

    Args:
        moving: ``[d, h, w]`` moving image (any orientation and spacing; its header must be right).
        moving_affine: its 4x4 voxel->mm affine.
        fixed: ``[D, H, W]`` fixed image (the atlas), ``fixed_affine`` its voxel->mm affine.
        moving_mask, fixed_mask: optional foregrounds for the initialisation (default: :func:`foreground`); given
            both, the initial scale is the cube root of their volume ratio, else 1.
        region: ``[D, H, W]`` where (on the fixed grid) the NCC is computed, dilated by two level voxels; default:
            the fixed foreground (e.g. the atlas brain mask for a head with skull and neck: the neck, which some
            volumes have and others not, does not pull the fit).
        levels: the side of the cube grid of each level (coarse to fine), voxels.
        iters: Adam steps per level.
        lr: Adam's step size for the linear part (dimensionless) and the translation (per 100 mm); halved per level.
    Returns:
        :class:`AffineFit`: ``world`` maps moving world -> fixed world (mm).
    """
    if len(levels) != len(iters):
        raise ValueError(f"fit_affine: levels {list(levels)} and iters {list(iters)} differ in length")
    m_fg, f_fg = foreground(moving, moving_mask), foreground(fixed, fixed_mask)
    init = moments_init(m_fg, moving_affine, f_fg, fixed_affine, scale=moving_mask is not None and fixed_mask is not None)
    region = f_fg if region is None else np.asarray(region) > 0
    c_f, _ = _world_moments(f_fg, fixed_affine)
    t_init = np.linalg.inv(init)  # fixed world -> moving world
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float64 reductions (and result) on every machine
    try:
        inv_mov = torch.from_numpy(np.linalg.inv(moving_affine))
        centre = torch.from_numpy(c_f)
        lin0 = torch.from_numpy(t_init[:3, :3].copy())
        # T(y) = lin @ (y - c_f) + lin0 @ c_f + t0 + 100 * dt: the translation is about the fixed centroid
        base = torch.from_numpy(t_init[:3, :3] @ c_f + t_init[:3, 3])
        d_lin = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        d_t = torch.zeros(3, dtype=torch.float64, requires_grad=True)

        def transform() -> tuple[torch.Tensor, torch.Tensor]:
            lin = lin0 + d_lin
            return lin, base + 100.0 * d_t - lin @ centre

        ncc_init = ncc = 0.0
        for k, (dims, n_iter) in enumerate(zip(levels, iters, strict=True)):
            lv = _level(moving, moving_affine, fixed, fixed_affine, region, int(dims))
            opt = torch.optim.Adam([d_lin, d_t], lr=lr / 2**k)
            for _ in range(int(n_iter)):
                opt.zero_grad()
                loss = -_ncc(_moving_on_level(lv, inv_mov, *transform()), lv.fixed, lv.weight)
                loss.backward()
                opt.step()
            with torch.no_grad():
                ncc = float(_ncc(_moving_on_level(lv, inv_mov, *transform()), lv.fixed, lv.weight))
                if k == len(levels) - 1:
                    ncc_init = float(_ncc(_moving_on_level(lv, inv_mov, lin0, base - lin0 @ centre), lv.fixed, lv.weight))
        with torch.no_grad():
            lin, shift = transform()
    finally:
        torch.set_num_threads(threads)
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = lin.numpy(), shift.numpy()
    world = np.linalg.inv(t)
    world[:3, :3] = np.round(world[:3, :3], 9)
    world[:3, 3] = np.round(world[:3, 3], 6)
    return AffineFit(world, ncc_init, ncc)
