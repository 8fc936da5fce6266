"""Variational registration: fitting the approximate posterior q_v of each pair's velocity field.

For a batch of pairs ``(F, M_k)`` and a frozen (but differentiable) metric ``E``, q_v minimises

    L(q_v) = E_{v ~ q_v} [ E(F, M o phi(S v)) + R(S v) ] - H(q_v),

estimated with one antithetic pair of reparameterised samples per step, where ``S`` is the Sobolev smoother
(identity backward), ``R`` the L2 gradient regulariser and ``H`` the low-rank Gaussian entropy. Adam runs
``no_iters`` steps (1024 for SSD, 1344 for LCC in the original).

No Lightning here: :class:`VariationalRegistration` is used by the training module, the test CLI and
:func:`learnsim.api.register` alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from learnsim.distributions import Generators, LowRankParams, antithetic_samples, init_q_v, rand
from learnsim.energies import RegLossL2
from learnsim.metric import SimilarityMetric
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import warp
from learnsim.transformation import SVF

__all__ = ["VariationalRegistration", "FitResult"]

ProgressFn = Callable[[int, Tensor], None]


@dataclass
class FitResult:
    """What one q_v fit returns.

    Attributes:
        params: the fitted q_v (``loc``/``log_var`` ``[B, *param_shape]``, ``u`` ``[B, r, *param_shape]``), detached.
        loss: the final loss per pair ``[B]`` (a tensor: reading it syncs the device).
        seconds: wall-clock time of the fit (synchronised at the end).
        history: ``(iteration, loss [B])`` pairs recorded every ``log_every`` iterations.
    """

    params: LowRankParams
    loss: Tensor
    seconds: float
    history: list[tuple[int, Tensor]] = field(default_factory=list)


class VariationalRegistration:
    """Fit q_v for batches of pairs and draw transformations from it.

    Args:
        metric: the similarity metric (baseline or learnt); frozen during fitting.
        transformation: :class:`~learnsim.transformation.SVF` or ``SVFFD``.
        reg: the regulariser (``0.5 w_reg ||grad v||^2``).
        sobolev: Sobolev smoother of the samples (identity backward).
        no_iters: Adam steps per fit.
        lr: Adam learning rate for q_v.
        sigma_init, u_init, rank: q_v initialisation (0.5, 0.1, 1 in the original).
        uniform_noise: magnitude ``a`` of the U(-a, a) voxel noise added to the sampling coordinates after
            integration while *training* (0 disables); never used at test time.
        amp: run the energies in bf16 autocast on CUDA (parameters and integration stay fp32).
    """

    def __init__(
        self,
        metric: SimilarityMetric,
        transformation: SVF,
        reg: RegLossL2,
        sobolev: SobolevSmoother,
        no_iters: int = 1024,
        lr: float = 0.01,
        sigma_init: float = 0.5,
        u_init: float = 0.1,
        rank: int = 1,
        uniform_noise: float = 0.1,
        amp: bool = False,
    ) -> None:
        self.metric = metric
        self.transformation = transformation
        self.reg = reg
        self.sobolev = sobolev
        self.no_iters = int(no_iters)
        self.lr = float(lr)
        self.sigma_init = float(sigma_init)
        self.u_init = float(u_init)
        self.rank = int(rank)
        self.uniform_noise = float(uniform_noise)
        self.amp = bool(amp)

    # ------------------------------------------------------------------------------------------------ q_v
    def init_params(self, batch: int, shape: Sequence[int], device: torch.device | None = None) -> LowRankParams:
        """Fresh q_v for ``batch`` pairs on an image grid ``shape``."""
        return init_q_v(batch, self.transformation.param_shape(shape), self.sigma_init, self.u_init, self.rank, device)

    def displacement(self, params_sample: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Smoothed velocity and displacement of a parameter sample: ``([B,3,D,H,W], [B,3,D,H,W])`` voxels."""
        v = self.transformation.velocity(self.sobolev(params_sample), shape)
        return v, self.transformation(v)

    def add_coordinate_noise(self, disp: Tensor, generator: Generators = None, chunks: int = 1) -> Tensor:
        """``disp`` plus U(-a, a) voxel noise on every sampling coordinate (``a = uniform_noise``; 0: unchanged).

        ``disp`` holds ``chunks`` stacked batches of pairs; each chunk is drawn separately so that per-pair
        generators give every pair its own stream. Used while training only.
        """
        if self.uniform_noise <= 0:
            return disp
        b = disp.shape[0] // chunks
        noise = torch.cat([rand((b, *disp.shape[1:]), disp, generator) for _ in range(chunks)])
        return disp + (noise * 2 - 1) * self.uniform_noise

    def _autocast(self, device: torch.device):
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(
        self,
        params: LowRankParams,
        feat_fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None,
        training: bool,
        generator: Generators = None,
    ) -> Tensor:
        """The q_v loss per pair ``[B]`` for one antithetic pair of samples.

        Args:
            feat_fixed: the fixed image's features ``a(F)`` ``[1 or B, 1, D, H, W]`` (precomputed, frozen).
            moving: ``[B, 1, D, H, W]``.
            mask: ``[1 or B, 1, D, H, W]`` or None.
            training: add the uniform coordinate noise.
            generator: one generator, one per pair (reproducible per pair), or None (global RNG).
        """
        b = moving.shape[0]
        shape = moving.shape[2:]
        v1, v2 = antithetic_samples(params, generator)
        v, disp = self.displacement(torch.cat([v1, v2]), shape)
        if training:
            # antithetic halves get independent noise, drawn from the same per-pair generators
            disp = self.add_coordinate_noise(disp, generator, chunks=2)
        with self._autocast(moving.device):
            warped = warp(moving.repeat(2, 1, 1, 1, 1), disp)
            feat_warped = self.metric.features(warped)
            ff = feat_fixed if feat_fixed.shape[0] == 1 else feat_fixed.repeat(2, 1, 1, 1, 1)
            m = mask if (mask is None or mask.shape[0] == 1) else mask.repeat(2, 1, 1, 1, 1)
            data = self.metric.energy_from_features(ff, feat_warped, m).to(v.dtype)
        energy = data + self.reg(v)
        return energy.view(2, b).mean(0) - params.entropy()

    def fit(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        params: LowRankParams | None = None,
        no_iters: int | None = None,
        training: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        progress: ProgressFn | None = None,
        log_every: int = 0,
        generator: Generators = None,
    ) -> FitResult:
        """Fit q_v for a batch of pairs with the metric frozen.

        Args:
            fixed: ``[1 or B, 1, D, H, W]`` fixed image(s) in [0, 1].
            moving: ``[B, 1, D, H, W]`` moving images in [0, 1].
            mask: fixed-image mask ``[1 or B, 1, D, H, W]`` (energies are summed inside it) or None.
            params: warm start (e.g. the pair's stored state); fresh initialisation if None.
            no_iters: overrides ``self.no_iters``.
            training: training mode (uniform coordinate noise on).
            optimizer: an optimiser whose single param group will be pointed at the q_v tensors (the training
                module passes its q_v optimiser so Lightning owns it); a fresh Adam(lr) otherwise. Its state is
                reset: every batch of pairs starts Adam from scratch, as in the original.
            progress: called as ``progress(iteration, loss_per_pair)`` every ``log_every`` iterations; the
                loss is a device tensor (no host sync unless the callback reads it).
        Returns:
            :class:`FitResult` with detached parameters.
        """
        if moving.dim() != 5 or moving.shape[1] != 1:
            raise ValueError(f"fit: moving must be [B, 1, D, H, W]; got {tuple(moving.shape)}")
        if fixed.shape[2:] != moving.shape[2:]:
            raise ValueError(f"fit: fixed grid {tuple(fixed.shape[2:])} != moving grid {tuple(moving.shape[2:])}")
        start = time.perf_counter()
        b, shape, device = moving.shape[0], moving.shape[2:], moving.device
        if params is None:
            params = self.init_params(b, shape, device)
        leaves = [t.detach().clone().requires_grad_(True) for t in params.tensors()]
        q = LowRankParams(*leaves)
        if optimizer is None:
            # fused: one pass per parameter for the whole update (8x faster than foreach on a busy 2-core CPU)
            optimizer = torch.optim.Adam(leaves, lr=self.lr, fused=leaves[0].device.type in ("cpu", "cuda"))
        else:
            optimizer.param_groups[0]["params"] = leaves
            optimizer.state.clear()
        # the metric is frozen here: a(F) once, and no gradients into the metric's weights
        was_training = self.metric.training
        self.metric.eval()
        requires = [p.requires_grad for p in self.metric.parameters()]
        for p in self.metric.parameters():
            p.requires_grad_(False)
        history: list[tuple[int, Tensor]] = []
        try:
            with torch.no_grad(), self._autocast(device):
                feat_fixed = self.metric.features(fixed).float()
            loss = torch.zeros(b, device=device)
            for it in range(no_iters if no_iters is not None else self.no_iters):
                loss = self.loss(q, feat_fixed, moving, mask, training, generator)
                optimizer.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(loss.sum(), leaves)
                for leaf, g in zip(leaves, grads, strict=True):
                    leaf.grad = g.contiguous()  # autograd may hand back an expanded view; fused Adam needs real strides
                optimizer.step()
                if log_every and (it % log_every == 0):
                    detached = loss.detach()
                    history.append((it, detached))
                    if progress is not None:
                        progress(it, detached)
        finally:
            for p, r in zip(self.metric.parameters(), requires, strict=True):
                p.requires_grad_(r)
            self.metric.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return FitResult(q.detach(), loss.detach(), time.perf_counter() - start, history)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def mean_displacement(self, params: LowRankParams, shape: Sequence[int]) -> Tensor:
        """Displacement ``[B, 3, D, H, W]`` (voxels) of the posterior mean velocity."""
        return self.displacement(params.loc, shape)[1]

    @torch.no_grad()
    def sample_displacements(
        self, params: LowRankParams, shape: Sequence[int], n: int, generator: Generators = None
    ) -> Tensor:
        """``n`` displacements drawn from q_v (in antithetic pairs), ``[n, B, 3, D, H, W]`` voxels."""
        out = []
        while len(out) < n:
            for s in antithetic_samples(params, generator):
                if len(out) < n:
                    out.append(self.displacement(s, shape)[1])
        return torch.stack(out)
