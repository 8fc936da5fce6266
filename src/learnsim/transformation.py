"""Transformation models: how q_v's parameters become a velocity field and then a diffeomorphism.

* :class:`SVF` (``transformation=svf``): the parameters are the dense velocity field ``[B, 3, D, H, W]``.
* :class:`SVFFD` (``transformation=svffd``, the original ``SVFFD_3D``): the parameters are cubic B-spline
  control-point coefficients, evaluated on the dense grid before integration.

Both integrate with scaling and squaring (:func:`learnsim.spatial.integrate_svf`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from learnsim.spatial import bspline_control_shape, bspline_to_dense, integrate_svf

__all__ = ["SVF", "SVFFD"]


class SVF(nn.Module):
    """Dense stationary velocity field integrated by ``no_steps`` squarings (12 in the original)."""

    def __init__(self, no_steps: int = 12) -> None:
        super().__init__()
        self.no_steps = int(no_steps)

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one pair's parameters for an image grid ``(D, H, W)``."""
        return (3, *(int(s) for s in shape))

    def velocity(self, params: Tensor, shape: Sequence[int]) -> Tensor:
        """Dense velocity ``[B, 3, D, H, W]`` (voxels) from the parameters."""
        return params

    def forward(self, v: Tensor) -> Tensor:
        """Displacement ``[B, 3, D, H, W]`` (voxels) of ``exp(v)``."""
        return integrate_svf(v, self.no_steps)


class SVFFD(SVF):
    """SVF parametrised by a cubic B-spline control grid with ``cps`` voxels between control points."""

    def __init__(self, no_steps: int = 12, cps: int | Sequence[int] = 2) -> None:
        super().__init__(no_steps)
        self.cps = int(cps) if isinstance(cps, int) else tuple(int(c) for c in cps)

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (3, *bspline_control_shape(shape, self.cps))

    def velocity(self, params: Tensor, shape: Sequence[int]) -> Tensor:
        return bspline_to_dense(params, shape, self.cps)
