"""Low-rank Gaussian distributions: the posterior q_v of each pair's velocity field and the image model q_f.

Both are ``N(mu, diag(sigma^2) + sum_r u_r u_r^T)`` over a volume-shaped event. Parameters are kept as
``loc [B, *event]``, ``log_var [B, *event]`` and ``u [B, r, *event]`` (rank ``r``, 1 in the original).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from learnsim.energies import low_rank_entropy
from learnsim.kernels.backend import use_numba

__all__ = ["LowRankParams", "antithetic_samples", "antithetic_pair", "init_q_v", "QF", "Generators", "randn", "rand"]

# One generator for the whole batch, one per batch element (reproducible per pair whatever the batch/DDP layout),
# or None for the global RNG.
Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(fn, shape: Sequence[int], like: Tensor, generator: Generators) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return fn(tuple(shape), device=like.device, dtype=like.dtype, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"need one generator per batch element: {shape[0]} elements, {len(generator)} generators")
    return torch.stack([fn(tuple(shape[1:]), device=like.device, dtype=like.dtype, generator=g) for g in generator])


def randn(shape: Sequence[int], like: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal draws shaped ``shape`` on ``like``'s device and dtype (see :data:`Generators`)."""
    return _draw(torch.randn, shape, like, generator)


def rand(shape: Sequence[int], like: Tensor, generator: Generators = None) -> Tensor:
    """U(0, 1) draws shaped ``shape`` on ``like``'s device and dtype (see :data:`Generators`)."""
    return _draw(torch.rand, shape, like, generator)


@dataclass
class LowRankParams:
    """Parameters of a batch of low-rank Gaussians: ``loc``/``log_var`` ``[B, *event]``, ``u`` ``[B, r, *event]``."""

    loc: Tensor
    log_var: Tensor
    u: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.loc, self.log_var, self.u]

    def entropy(self) -> Tensor:
        """``0.5 log det Sigma`` per batch element, ``[B]`` (entropy up to its constant)."""
        return low_rank_entropy(self.log_var, self.u)

    def detach(self) -> LowRankParams:
        return LowRankParams(self.loc.detach(), self.log_var.detach(), self.u.detach())


def _draws(p: LowRankParams, generator: Generators) -> tuple[Tensor, Tensor]:
    """The pair's standard normal draws: ``eps`` ``[B, *event]`` voxel-wise, then ``xi`` ``[B, r]`` (this order)."""
    eps = randn(p.loc.shape, p.loc, generator)
    b, r = p.u.shape[:2]
    return eps, randn((b, r), p.loc, generator)


def _noise(p: LowRankParams, eps: Tensor, xi: Tensor) -> Tensor:
    b, r = p.u.shape[:2]
    xi = xi.view(b, r, *([1] * (p.u.dim() - 2)))
    return torch.exp(0.5 * p.log_var) * eps + (xi * p.u).sum(1)


def antithetic_samples(p: LowRankParams, generator: Generators = None) -> tuple[Tensor, Tensor]:
    """Reparameterised antithetic pair ``mu +/- (sigma * eps + sum_r xi_r u_r)``.

    ``eps ~ N(0, I)`` voxel-wise and ``xi ~ N(0, I_r)`` one scalar per rank and batch element.

    Returns:
        Two tensors shaped like ``p.loc``.
    """
    noise = _noise(p, *_draws(p, generator))
    return p.loc + noise, p.loc - noise


def antithetic_pair(p: LowRankParams, generator: Generators = None) -> tuple[Tensor, Tensor]:
    """The antithetic pair stacked, ``[2B, *event]`` (the ``+`` halves first), and ``p``'s entropy ``[B]``.

    Equal to ``torch.cat(antithetic_samples(p, generator))`` and ``p.entropy()`` (same draws from ``generator``);
    on CPU the numba kernel computes both, and their gradients, in one pass each
    (:func:`learnsim.kernels.ops.antithetic_pair`).
    """
    eps, xi = _draws(p, generator)
    if use_numba(p.loc, p.log_var, p.u):
        from learnsim.kernels import ops

        return ops.antithetic_pair(p.loc, p.log_var, p.u, eps, xi)
    noise = _noise(p, eps, xi)
    return torch.cat([p.loc + noise, p.loc - noise]), p.entropy()


def init_q_v(
    batch: int,
    event_shape: tuple[int, ...],
    sigma_init: float = 0.5,
    u_init: float = 0.1,
    rank: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> LowRankParams:
    """The original initialisation: ``mu = 0``, ``sigma = sigma_v_init``, ``u = u_v_init`` everywhere."""
    loc = torch.zeros((batch, *event_shape), device=device, dtype=dtype)
    log_var = torch.full_like(loc, 2.0 * math.log(sigma_init))
    u = torch.full((batch, rank, *event_shape), u_init, device=device, dtype=dtype)
    return LowRankParams(loc, log_var, u)


class QF(nn.Module):
    """q_f: low-rank Gaussian over "fixed-like" images; mean = the atlas (not learnt), covariance learnt.

    Args:
        fixed: ``[1, 1, D, H, W]`` atlas in [0, 1].
        sigma_init: initial standard deviation (0.1 in the original).
        u_init: initial low-rank factor (0.1).
        rank: rank of the low-rank part.
        loc_learnable: the original keeps the mean fixed (False); True is allowed for experiments.
        cov_learnable: learn ``log_var`` and ``u`` (True).
    Constraints (applied by :meth:`clamp_`, after every optimiser step): ``log_var <= 0``, ``u`` in ``[-1, 1]``.
    """

    def __init__(
        self,
        fixed: Tensor,
        sigma_init: float = 0.1,
        u_init: float = 0.1,
        rank: int = 1,
        loc_learnable: bool = False,
        cov_learnable: bool = True,
    ) -> None:
        super().__init__()
        if fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
            raise ValueError(f"QF: fixed must be [1, 1, D, H, W]; got {tuple(fixed.shape)}")
        p = init_q_v(1, tuple(fixed.shape[1:]), sigma_init, u_init, rank, fixed.device, fixed.dtype)
        if loc_learnable:
            self.loc = nn.Parameter(fixed.detach().clone())
        else:
            self.register_buffer("loc", fixed.detach().clone())
        self.log_var = nn.Parameter(p.log_var, requires_grad=cov_learnable)
        self.u = nn.Parameter(p.u, requires_grad=cov_learnable)

    @property
    def params(self) -> LowRankParams:
        return LowRankParams(self.loc, self.log_var, self.u)

    def sample_antithetic(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two images ``[1, 1, D, H, W]`` clamped to ``[0, 1]``."""
        a, b = antithetic_samples(self.params, generator)
        return a.clamp(0.0, 1.0), b.clamp(0.0, 1.0)

    def entropy(self) -> Tensor:
        return self.params.entropy()[0]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_var.clamp_(max=0.0)
        self.u.clamp_(-1.0, 1.0)
