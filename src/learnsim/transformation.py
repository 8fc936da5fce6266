"""Transformation models: how q_v's parameters become a velocity field and then a diffeomorphism.

* :class:`SVF` (``transformation=svf``): the parameters are the dense velocity field ``[B, 3, D, H, W]``.
* :class:`SVFFD` (``transformation=svffd``, the original ``SVFFD_3D``): the parameters are cubic B-spline
  control-point coefficients, evaluated on the dense grid before integration.

Both integrate with scaling and squaring (:func:`learnsim.spatial.integrate_svf`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from torch import Tensor, nn

from learnsim.fast_integration import integrate_fast
from learnsim.spatial import bspline_control_shape, bspline_to_dense, integrate_svf

__all__ = ["SVF", "SVFFD", "TransformationKind"]


class SVF(nn.Module):
    """Dense stationary velocity field integrated by ``no_steps`` squarings (12 in the original).

    Args:
        no_steps: squarings (an int >= 0, 12 in the original) or ``"auto"`` (fast mode: the fewest squarings that
            keep the first step under half a voxel, at most 12; see :mod:`learnsim.fast_integration`).
        int_downsize: fast mode: integrate on a grid this many times coarser (1, the default, is the image grid).
    """

    def __init__(self, no_steps: int | str = 12, int_downsize: int = 1) -> None:
        super().__init__()
        if no_steps != "auto" and (isinstance(no_steps, bool) or not isinstance(no_steps, int) or no_steps < 0):
            raise ValueError(f"transformation.no_steps: expected an integer >= 0 or 'auto'; got {no_steps!r}")
        if isinstance(int_downsize, bool) or not isinstance(int_downsize, int) or int_downsize < 1:
            raise ValueError(f"transformation.int_downsize: expected an integer >= 1; got {int_downsize!r}")
        self.no_steps = no_steps if no_steps == "auto" else int(no_steps)
        self.int_downsize = int(int_downsize)

    @property
    def exact(self) -> bool:
        """Whether this is the paper's integration (fixed squarings on the image grid), not fast mode."""
        return self.no_steps != "auto" and self.int_downsize == 1

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one pair's parameters for an image grid ``(D, H, W)``."""
        return (3, *(int(s) for s in shape))

    def velocity(self, params: Tensor, shape: Sequence[int]) -> Tensor:
        """Dense velocity ``[B, 3, D, H, W]`` (voxels) from the parameters."""
        return params

    def forward(self, v: Tensor) -> Tensor:
        """Displacement ``[B, 3, D, H, W]`` (voxels) of ``exp(v)``."""
        if self.exact:
            return integrate_svf(v, self.no_steps)
        return integrate_fast(v, self.no_steps, self.int_downsize)


class SVFFD(SVF):
    """SVF parametrised by a cubic B-spline control grid with ``cps`` voxels between control points."""

    def __init__(self, no_steps: int | str = 12, cps: int | Sequence[int] = 2, int_downsize: int = 1) -> None:
        super().__init__(no_steps, int_downsize)
        self.cps = int(cps) if isinstance(cps, int) else tuple(int(c) for c in cps)

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (3, *bspline_control_shape(shape, self.cps))

    def velocity(self, params: Tensor, shape: Sequence[int]) -> Tensor:
        return bspline_to_dense(params, shape, self.cps)


class TransformationKind(str, Enum):
    """The transformation model by name (``learnsim.register(transformation=...)``; configs use ``_target_``)."""

    SVF = "svf"
    SVFFD = "svffd"

    def build(self, no_steps: int | str = 12, cps: int | Sequence[int] = 2, int_downsize: int = 1) -> SVF:
        """The model: :class:`SVF` (``cps`` unused) or :class:`SVFFD` with ``cps`` voxels between control points;
        ``no_steps="auto"`` / ``int_downsize > 1`` are fast mode (:mod:`learnsim.fast_integration`)."""
        if self is TransformationKind.SVFFD:
            return SVFFD(no_steps, cps, int_downsize)
        return SVF(no_steps, int_downsize)
