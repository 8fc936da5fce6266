"""Sobolev gradients: a smoothing operator with an identity backward pass.

The original code smooths each velocity sample with a separable kernel ``S`` before warping, but lets the
gradient pass through unchanged. Each Adam step on the q_v parameters is then a Sobolev-preconditioned step
(the parameters are updated with raw gradients, but what the energies see is ``S v``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learnsim.kernels.backend import use_numba
from learnsim.spatial import separable_filter

__all__ = ["sobolev_kernel_1d", "SobolevSmoother"]


def sobolev_kernel_1d(s: int = 3, lam: float = 0.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised middle column of ``(I - lambda L)^-1``, ``L`` the 1D Laplacian ``[1, -2, 1]`` on ``2s+1`` points.

    Returns:
        ``[2 s + 1]`` kernel summing to 1.
    """
    if s < 0 or lam < 0:
        raise ValueError(f"sobolev_kernel_1d: need s >= 0 and lambda >= 0; got s={s}, lambda={lam}")
    n = 2 * s + 1
    lap = -2.0 * torch.eye(n, dtype=torch.float64) + torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) + torch.diag(
        torch.ones(n - 1, dtype=torch.float64), -1
    )
    a = torch.eye(n, dtype=torch.float64) - lam * lap
    col = torch.linalg.inv(a)[:, s]
    return (col / col.sum()).to(dtype)


class _SmoothIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field: Tensor, weights: list[float]) -> Tensor:  # type: ignore[override]
        if use_numba(field):
            from learnsim.kernels import ops

            return ops.smooth(field, weights)
        return separable_filter(field, weights)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class SobolevSmoother(nn.Module):
    """``v_s = S * v`` in the forward pass, identity in the backward pass; ``[B, C, D, H, W] -> same``.

    Args:
        enabled: ``False`` makes this the identity (original ``Sobolev_grad.enabled``).
        s: half-width of the kernel (3 in the original).
        lam: ``lambda`` of ``(I - lambda L)`` (0.5 in the original).
    """

    def __init__(self, enabled: bool = True, s: int = 3, lam: float = 0.5) -> None:
        super().__init__()
        self.enabled = enabled
        self.register_buffer("kernel", sobolev_kernel_1d(s, lam, torch.float32), persistent=False)
        # host floats: applying the kernel never reads device memory (no sync in the q_v loop)
        self.weights = self.kernel.tolist()

    def forward(self, field: Tensor) -> Tensor:
        if not self.enabled:
            return field
        return _SmoothIdentityBackward.apply(field, self.weights)
