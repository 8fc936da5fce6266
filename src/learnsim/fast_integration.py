"""Fast-mode integration of a stationary velocity field: fewer squarings and/or a coarser integration grid.

Both options change the numerics a little (docs/speed.md reports what they do to DSC); the
exact path (12 squarings on the image grid, the paper's) stays the default.

* **Adaptive squarings** (``no_steps="auto"``): the fewest squarings ``T <= max_steps`` with
  ``max |v| / 2^T <= max_step`` voxels (0.5 by default, the usual bound for the first-order step
  ``exp(v / 2^T) ~ id + v / 2^T`` to stay invertible), chosen per call from the largest velocity of the batch.
  The choice is a non-differentiable integer; the gradient is that of the ``T``-step integration.
* **Integration at reduced resolution** (``int_downsize=f``, as VoxelMorph's ``int_downsize``): ``v`` is
  resampled trilinearly to a grid ``f`` times coarser, integrated there, and the displacement resampled back. A
  field in voxel units is rescaled by the ratio of voxel sizes on the way (``align_corners=True`` geometry: the
  corner voxels of both grids coincide, so an axis of ``n`` voxels spans ``n - 1`` intervals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim.spatial import integrate_svf

__all__ = ["auto_steps", "resize_field", "integrate_fast", "coarse_shape"]


def auto_steps(v: Tensor, max_step: float = 0.5, max_steps: int = 12) -> int:
    """The fewest squarings ``T`` in ``[0, max_steps]`` with ``max |v| / 2^T <= max_step`` (voxels).

    Reads one scalar from the device (a host sync on CUDA).
    """
    if not v.numel():
        return 0
    lo, hi = torch.aminmax(v.detach())  # one pass and no |v| temporary (50 MB at 128^3, B = 2)
    vmax = max(-float(lo), float(hi))
    if not math.isfinite(vmax):
        return int(max_steps)
    if vmax <= max_step:
        return 0
    return int(min(max_steps, math.ceil(math.log2(vmax / max_step))))


def coarse_shape(shape: Sequence[int], factor: int) -> tuple[int, int, int]:
    """The integration grid for ``int_downsize=factor``: ``ceil((n - 1) / factor) + 1`` voxels per axis (so that
    for odd ``n`` every ``factor``-th voxel of the fine grid is a coarse voxel)."""
    return tuple(int(math.ceil((int(n) - 1) / factor)) + 1 for n in shape)  # type: ignore[return-value]


def resize_field(field: Tensor, shape: Sequence[int]) -> Tensor:
    """Trilinear resampling of a voxel-unit field ``[B, 3, D, H, W]`` to ``shape``, its components rescaled.

    Component ``c`` (along axis ``c``) is multiplied by ``(n'_c - 1) / (n_c - 1)``: one voxel of the source grid is
    that many voxels of the target grid (``align_corners=True``: both grids span the same extent).
    """
    src = field.shape[2:]
    if tuple(src) == tuple(shape):
        return field
    out = F.interpolate(field, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
    scale = [(t - 1) / (s - 1) if s > 1 else 1.0 for s, t in zip(src, shape, strict=True)]
    return out * torch.tensor(scale, dtype=out.dtype, device=out.device).view(1, 3, 1, 1, 1)


def integrate_fast(v: Tensor, no_steps: int | str = "auto", int_downsize: int = 1, max_steps: int = 12) -> Tensor:
    """Displacement of ``exp(v)`` in fast mode; ``v`` ``[B, 3, D, H, W]`` voxels -> same shape.

    Args:
        no_steps: squarings, or ``"auto"`` (see :func:`auto_steps`, capped at ``max_steps``).
        int_downsize: integrate on a grid this many times coarser (1: the image grid).
    """
    shape = v.shape[2:]
    vc = resize_field(v, coarse_shape(shape, int_downsize)) if int_downsize > 1 else v
    steps = auto_steps(vc, max_steps=max_steps) if no_steps == "auto" else int(no_steps)
    u = integrate_svf(vc, steps)
    return resize_field(u, shape) if int_downsize > 1 else u
