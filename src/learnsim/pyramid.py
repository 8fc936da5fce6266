r"""Coarse-to-fine q_v: an image pyramid and the transfer of q_v from a coarse level to the next finer one.

Grids and units
---------------
Level 0 is the finest (the image grid, ``n`` voxels per axis, spacing ``h``); level ``l + 1`` has
``m = ceil(n / 2)`` voxels per axis. Both grids cover the same field of view with the ``align_corners=False``
convention of :func:`torch.nn.functional.interpolate`: coarse voxel ``j`` sits at fine voxel coordinate
``s (j + 1/2) - 1/2`` with ``s = n / m`` (exactly 2 for even ``n``), i.e. the coarse spacing is ``s h`` and the
coarse voxel -> mm affine is ``A_fine @ [[diag(s), (s - 1) / 2], [0, 1]]``. Velocities are in voxels of their own
level, so one coarse voxel is ``s`` fine voxels.

Down-sampling (:func:`downsample`) is anti-aliased: a separable Gaussian of std ``s / 2`` fine voxels
(replicate padding), then trilinear sampling at the coarse voxel centres (for ``s = 2`` that sampling is itself a
2-tap box average, so the whole filter is the Gaussian convolved with the box that the coarse voxel covers).
Masks are filtered the same way and kept as soft weights in [0, 1]: the energies multiply by the mask, so a
coarse voxel half inside the brain counts half.

Why the same energy weights at every level
-------------------------------------------
The data term (SSD, LCC), the regulariser ``0.5 w sum |forward differences of v|^2`` and the entropy are all sums
over voxels of quantities that do not depend on the spacing when ``v`` is in voxels (a forward difference of a
voxel-unit velocity is the dimensionless derivative ``dv/dx``). Each level's loss is therefore ``~ 1 / s^3`` times
a discretisation of the same continuous functional (per unit volume), and the optimum of the coarse problem is
an approximation of the fine one: no re-weighting between levels is needed.

Transfer of q_v (:func:`upsample_q_v`)
--------------------------------------
q_v is ``N(mu, diag(sigma^2) + sum_r u_r u_r^T)`` in coarse voxels. Let ``U`` be trilinear up-sampling to the fine
grid (``align_corners=False``, border clamping) and ``S = diag(s_d)`` the per-component change of voxel units. The
fine starting guess is

* ``mu_f = S U mu_c``: a velocity of ``c`` coarse voxels is ``s c`` fine voxels, the same vector in mm. A constant
  field stays constant, so its scaling-and-squaring exponential, the translation ``c`` coarse voxels, is the same
  translation in mm at both levels.
* ``u_f = S U u_c``: the low-rank part is the random field ``xi u`` with one scalar ``xi ~ N(0, 1)`` per rank; its
  push-forward through the (linear) transfer is exactly ``xi S U u_c``, so the coarse posterior's global modes are
  carried over unchanged (same field in mm).
* ``log sigma_f^2 = U log sigma_c^2 + 2 log S``: the per-voxel standard deviation is scaled like the velocity
  (``sigma_f = s sigma_c`` where ``sigma_c`` is constant): every point keeps the marginal std **in mm** that the
  coarse posterior gave it. ``log sigma^2`` (not ``sigma``) is interpolated: it is the parameter being optimised,
  and it keeps the next property exact.

Entropy. The diagonal part's exact push-forward ``S U eps_c`` would be degenerate on the fine grid (8x more
coordinates than random variables: entropy ``-inf``), so the diagonal part is re-drawn independently per fine voxel
with the coarse marginal std. The choice fixes what happens to the entropy: measured in mm (``v_mm = h v``,
``0.5 log det Sigma_mm = 0.5 log det Sigma + 3 N log h`` for ``N`` voxels, 3 components), the diagonal part's
entropy **per voxel** is preserved exactly,

    (1 / N_f) sum_f 0.5 log sigma_f,mm^2 = (1 / N_c) sum_c 0.5 log sigma_c,mm^2     (even grids),

because trilinear up-sampling by 2 with border clamping gives every coarse value a total weight of exactly 2 per
axis (3/4 + 3/4 + 1/4 + 1/4, or 1 + 3/4 + 1/4 at a border), so ``sum_f U x = 8 sum_c x``; then
``log sigma_f + log h_f = U (log sigma_c) + log s + log h_c - log s``. The entropy **per unit volume** therefore grows
by ``s^3 = 8``: each fine voxel is one more independent coordinate with the same uncertainty in mm. This is the
right starting guess for the data-dominated posterior: the curvature of the data term in a voxel-unit velocity is
``w (h dM/dx_mm)^2`` per voxel, 4x smaller on the fine grid, so the optimal ``sigma = curvature^-1/2`` doubles in
voxels (stays the same in mm). Where the regulariser dominates (its curvature, ``6 w_reg`` per voxel, does not
depend on ``h``) the fine optimum is smaller in mm, and the fine level's own iterations shrink ``sigma``. The
rank-``r`` term ``0.5 log(1 + sum (u / sigma)^2)`` is not extensive (one term per mode): with ``u / sigma`` carried
over pointwise its sum over voxels grows 8x and the term by at most ``0.5 log 8`` per mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim.distributions import LowRankParams
from learnsim.spatial import separable_filter

__all__ = ["coarse_shape", "level_shapes", "downsample", "build_pyramid", "upsample_field", "upsample_q_v", "Pyramid"]

Shape = tuple[int, int, int]


def coarse_shape(shape: Sequence[int]) -> Shape:
    """The next coarser grid: ``ceil(n / 2)`` voxels per axis (``[D, H, W]`` in, ``(d, h, w)`` out)."""
    if len(shape) != 3:
        raise ValueError(f"coarse_shape: expected a 3D grid; got {tuple(shape)}")
    return tuple(max(1, (int(n) + 1) // 2) for n in shape)  # type: ignore[return-value]


def level_shapes(shape: Sequence[int], levels: int) -> list[Shape]:
    """Grids of a ``levels``-level pyramid, **coarsest first**, ending with ``shape`` itself."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1; got {levels!r}")
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(levels - 1):
        shapes.append(coarse_shape(shapes[-1]))
    return list(reversed(shapes))  # type: ignore[arg-type]


def _gaussian_taps(sigma: float) -> list[float]:
    radius = max(1, int(math.ceil(3 * sigma)))
    k = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(k)
    return [w / total for w in k]


def downsample(x: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """Anti-aliased down-sampling of ``[B, C, D, H, W]`` to ``shape`` (default: :func:`coarse_shape`).

    A separable Gaussian of std ``s / 2`` fine voxels with ``s = n / m`` (replicate padding; the largest factor of
    the three axes sets the std), then trilinear sampling at the coarse voxel centres (``align_corners=False``).
    Intensities keep their range (the filter's weights sum to 1); masks come out as soft weights in [0, 1].
    """
    if x.dim() != 5:
        raise ValueError(f"downsample: expected [B, C, D, H, W]; got {tuple(x.shape)}")
    fine = tuple(x.shape[2:])
    target = coarse_shape(fine) if shape is None else tuple(int(n) for n in shape)
    if target == fine:
        return x
    s = max(f / t for f, t in zip(fine, target, strict=True))
    smoothed = separable_filter(x.float(), _gaussian_taps(0.5 * s)) if s > 1 else x.float()
    return F.interpolate(smoothed, size=target, mode="trilinear", align_corners=False).to(x.dtype)


def build_pyramid(x: Tensor | None, levels: int) -> list[Tensor | None]:
    """``[B, C, D, H, W]`` at every level, **coarsest first**, the last entry ``x`` itself (None stays None).

    Each level is down-sampled from the next finer one (factor 2 per level, :func:`downsample`).
    """
    shapes = level_shapes(x.shape[2:], levels) if x is not None else [None] * levels
    if x is None:
        return [None] * levels
    out = [x]
    for shape in reversed(shapes[:-1]):
        out.append(downsample(out[-1], shape))
    return list(reversed(out))


def _unit_scale(coarse: Sequence[int], fine: Sequence[int], like: Tensor) -> Tensor:
    """``[1, 3, 1, 1, 1]`` factors ``n_d / m_d``: fine voxels per coarse voxel along each axis (channel d = axis d)."""
    s = [f / c for f, c in zip(fine, coarse, strict=True)]
    return torch.tensor(s, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def upsample_field(v: Tensor, shape: Sequence[int]) -> Tensor:
    """A voxel-unit vector field ``[B, 3, d, h, w]`` on a coarse grid, as the same field on ``shape`` ``[B, 3, D, H, W]``.

    Trilinear (``align_corners=False``) and each component ``d`` multiplied by ``n_d / m_d`` (the fine grid's voxels
    per coarse voxel): the vectors are unchanged in mm.
    """
    if v.dim() != 5 or v.shape[1] != 3:
        raise ValueError(f"upsample_field: expected [B, 3, d, h, w]; got {tuple(v.shape)}")
    fine = tuple(int(n) for n in shape)
    up = F.interpolate(v, size=fine, mode="trilinear", align_corners=False)
    return up * _unit_scale(v.shape[2:], fine, v)


def upsample_q_v(params: LowRankParams, shape: Sequence[int]) -> LowRankParams:
    """Transfer q_v from its coarse grid to ``shape`` (the module docstring derives it).

    Args:
        params: ``loc``/``log_var`` ``[B, 3, d, h, w]``, ``u`` ``[B, r, 3, d, h, w]``, in coarse voxels.
        shape: the finer grid ``(D, H, W)``.
    Returns:
        ``loc = S U loc``, ``log_var = U log_var + 2 log S``, ``u = S U u`` on ``shape`` (fine voxels), detached.
    """
    loc, log_var, u = (t.detach() for t in params.tensors())
    if loc.dim() != 5 or loc.shape[1] != 3:
        raise ValueError(f"upsample_q_v: q_v must live on a dense voxel grid [B, 3, d, h, w]; got {tuple(loc.shape)}")
    fine = tuple(int(n) for n in shape)
    b, r = u.shape[:2]
    scale = _unit_scale(loc.shape[2:], fine, loc)
    new_loc = upsample_field(loc, fine)
    new_log_var = F.interpolate(log_var, size=fine, mode="trilinear", align_corners=False) + 2 * torch.log(scale)
    new_u = upsample_field(u.reshape(b * r, *u.shape[2:]), fine).reshape(b, r, 3, *fine)
    return LowRankParams(new_loc.contiguous(), new_log_var.contiguous(), new_u.contiguous())


class Pyramid:
    """Fixed image, moving images and mask at every level (coarsest first; the last level is the input grid).

    Args:
        fixed: ``[1 or B, 1, D, H, W]``; moving: ``[B, 1, D, H, W]``; mask: ``[1 or B, 1, D, H, W]`` or None.
        levels: number of levels (1: only the input grid).
    """

    def __init__(self, fixed: Tensor, moving: Tensor, mask: Tensor | None, levels: int) -> None:
        self.shapes = level_shapes(moving.shape[2:], levels)
        self.fixed = build_pyramid(fixed, levels)
        self.moving = build_pyramid(moving, levels)
        self.mask = build_pyramid(mask, levels)

    def __len__(self) -> int:
        return len(self.shapes)

    def level(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(fixed, moving, mask)`` of level ``i`` (0: coarsest)."""
        return self.fixed[i], self.moving[i], self.mask[i]  # type: ignore[return-value]
