"""The integration geometry of voxelmorph's PyTorch ``VxmDense`` before its January 2021 U-Net fix.

The original LearnSim release trained its VoxelMorph networks with that code, so its networks' displacements are
reproduced exactly only by integrating the way it did (``int_downsize = f``, ``int_steps = T``):

1. ``ResizeTransform(f)``: the velocity ``[B, 3, D, H, W]`` (voxels) is resampled trilinearly, ``align_corners=True``,
   to **exactly** ``(D // f, H // f, W // f)`` voxels (``int(dim / f)``) and multiplied by **exactly** ``1 / f``;
2. ``VecInt``: scaling and squaring on that grid, ``u <- u + u o (id + u)``, trilinear ``grid_sample`` with
   ``align_corners=True`` and **zeros** padding (displacement 0 outside the grid);
3. ``ResizeTransform(1 / f)``: multiplied by exactly ``f`` and resampled back to ``(D, H, W)``, ``align_corners=True``.

learnsim's own path (:func:`learnsim.fast_integration.integrate_fast`) differs on purpose: a ``ceil((n-1)/f) + 1``
grid (65^3 for 128^3) so that every ``f``-th voxel is a coarse node, factors ``(n' - 1) / (n - 1)`` (64/127, not
0.5) that keep the field's units exact, and border padding. On a released network the two differ by up to ~2
voxels (mean < 0.01): enough to matter when the released numbers are to be reproduced.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from learnsim.spatial import to_sampling_grid

__all__ = ["integrate_vxm2020", "INTEGRATIONS"]

#: the integration geometries of :class:`learnsim.voxelmorph.VoxelMorphNet`: learnsim's and the 2020 voxelmorph's
INTEGRATIONS = ("learnsim", "voxelmorph_2020")


def _resize(field: Tensor, size: tuple[int, ...], factor: float) -> Tensor:
    """Trilinear resampling to ``size`` (``align_corners=True``), values multiplied by ``factor``."""
    return F.interpolate(field, size=size, mode="trilinear", align_corners=True) * factor


def integrate_vxm2020(v: Tensor, no_steps: int, int_downsize: int = 2) -> Tensor:
    """Displacement of ``exp(v)`` in the 2020 voxelmorph geometry (module docstring).

    Args:
        v: ``[B, 3, D, H, W]`` velocity in voxels; ``D, H, W`` divisible by ``int_downsize``.
        no_steps: squarings ``T`` (0: ``v`` is returned, as voxelmorph does without integration).
        int_downsize: the integration grid is this many times coarser (1: the image grid).
    Returns:
        ``[B, 3, D, H, W]`` displacement in voxels (``phi = id + u``).
    """
    if v.dim() != 5 or v.shape[1] != 3:
        raise ValueError(f"integrate_vxm2020: v must be [B, 3, D, H, W]; got {tuple(v.shape)}")
    if no_steps < 0 or int_downsize < 1:
        raise ValueError(f"integrate_vxm2020: need no_steps >= 0 and int_downsize >= 1; got {no_steps}, {int_downsize}")
    if no_steps == 0:
        return v
    shape = tuple(int(n) for n in v.shape[2:])
    f = int(int_downsize)
    if any(n % f for n in shape):
        raise ValueError(f"integrate_vxm2020: grid {shape} is not divisible by int_downsize={f}")
    u = _resize(v, tuple(n // f for n in shape), 1.0 / f) if f > 1 else v
    u = u / 2.0**no_steps
    for _ in range(no_steps):
        u = u + F.grid_sample(u, to_sampling_grid(u), mode="bilinear", padding_mode="zeros", align_corners=True)
    return _resize(u, shape, float(f)) if f > 1 else u
