"""Variational registration: fitting the approximate posterior q_v of each pair's velocity field.

For a batch of pairs ``(F, M_k)`` and a frozen (but differentiable) metric ``E``, q_v minimises

    L(q_v) = E_{v ~ q_v} [ E(F, M o phi(S v)) + R(S v) ] - H(q_v),

estimated with one antithetic pair of reparameterised samples per step, where ``S`` is the Sobolev smoother
(identity backward), ``R`` the L2 gradient regulariser and ``H`` the low-rank Gaussian entropy. Adam runs
``no_iters`` steps (1024 for SSD, 1344 for LCC in the original).

Coarse-to-fine (:meth:`VariationalRegistration.fit_levels`, ``levels > 1``): the same loss is minimised on an
image pyramid (:mod:`learnsim.pyramid`), coarsest first, each level's q_v transferred to the next finer grid as
its starting guess (:func:`learnsim.pyramid.upsample_q_v`), with per-level iterations and learning rates.
``levels = 1`` is exactly :meth:`VariationalRegistration.fit` (the paper's single-resolution schedule).

No Lightning here: :class:`VariationalRegistration` is used by the training module, the test CLI and
:func:`learnsim.api.register` alike. It is built in one of two ways: from config (the ``registration`` group,
``learnsim/conf/registration/default.yaml``, a partial that the caller completes with its metric) or from the paper's
table (:meth:`VariationalRegistration.paper`, :mod:`learnsim.defaults`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from learnsim.distributions import (
    Generators,
    LowRankParams,
    antithetic_pair,
    antithetic_samples,
    init_q_v,
    rand,
)
from learnsim.divergence import CHECK_EVERY, check_fit, check_loss
from learnsim.energies import RegLossL2, StudentT
from learnsim.fused_adam import FusedAdam
from learnsim.likelihood import (
    LikelihoodLearning,
    PrecisionEstimate,
    residual_quadratic,
    squared_residual_map,
)
from learnsim.metric import SimilarityMetric
from learnsim.profiling import count_iterations, section, stage
from learnsim.pyramid import Pyramid, upsample_q_v
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import warp
from learnsim.transformation import SVF

__all__ = ["VariationalRegistration", "FitResult", "LevelSchedule", "FitProgress", "adam_q_v"]

ProgressFn = Callable[[int, Tensor], None]
#: ``optimizer(params, lr=lr)``: a fresh q_v optimiser over the given leaf tensors
OptimizerFactory = Callable[..., torch.optim.Optimizer]
#: ``on_level(level, no_levels, shape, no_iters)`` before each level of :meth:`VariationalRegistration.fit_levels`
LevelFn = Callable[[int, int, tuple[int, ...], int], None]


@dataclass(frozen=True)
class LevelSchedule:
    """Per-level q_v schedule, coarsest level first.

    Attributes:
        iters: Adam steps per level (``len == levels``).
        lr: Adam learning rate per level (``len == levels``).
    """

    iters: tuple[int, ...]
    lr: tuple[float, ...]

    @property
    def levels(self) -> int:
        return len(self.iters)

    @staticmethod
    def make(levels: int, no_iters: int, lr: float, level_iters: Sequence[int] | None = None,
             level_lr: Sequence[float] | None = None) -> LevelSchedule:
        """``levels`` levels; ``level_iters`` / ``level_lr`` (coarsest first) default to ``no_iters`` / ``lr`` at every level.

        Raises:
            ValueError: naming the key for a bad number of levels, a list of the wrong length or a bad value.
        """
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"q_v.levels must be an integer >= 1; got {levels!r}")
        iters = tuple(level_iters) if level_iters is not None else (int(no_iters),) * levels
        lrs = tuple(level_lr) if level_lr is not None else (float(lr),) * levels
        for key, vals in (("level_iters", iters), ("level_lr", lrs)):
            if len(vals) != levels:
                raise ValueError(f"q_v.{key} must list one value per level ({levels}), coarsest first; got {list(vals)}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in iters) or iters[-1] < 1:
            raise ValueError(f"q_v.level_iters must be integers >= 0 (>= 1 at the finest level); got {list(iters)}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lrs):
            raise ValueError(f"q_v.level_lr must be numbers > 0; got {list(lrs)}")
        return LevelSchedule(tuple(int(n) for n in iters), tuple(float(x) for x in lrs))


@dataclass
class FitResult:
    """What one q_v fit returns.

    Attributes:
        params: the fitted q_v (``loc``/``log_var`` ``[B, *param_shape]``, ``u`` ``[B, r, *param_shape]``), detached.
        loss: the final loss per pair ``[B]`` (a tensor: reading it syncs the device).
        seconds: wall-clock time of the fit (synchronised at the end).
        history: ``(iteration, loss [B])`` pairs recorded every ``log_every`` iterations.
        precision: where a learnt precision settled (``likelihood`` set: ``data_weight="auto"``), else None.
    """

    params: LowRankParams
    loss: Tensor
    seconds: float
    history: list[tuple[int, Tensor]] = field(default_factory=list)
    precision: PrecisionEstimate | None = None


class FitProgress:
    """A terminal progress bar of q_v iterations across levels: ``q_v level 2/3 32x32x32 | 150/350 | loss=...``.

    Pass the instance as ``progress`` and its :meth:`on_level` as ``on_level`` of
    :meth:`VariationalRegistration.fit_levels` (or :func:`learnsim.register`). The bar is drawn on stderr only
    when it is a terminal (``disable=None``; tqdm's rule), so logs and pipes stay clean.

    Args:
        total: iterations over all levels (``sum(schedule.iters)``).
        desc: prefix of the bar (e.g. the pair's name).
        disable: True never draws, False always, None only on a terminal.
    """

    def __init__(self, total: int, desc: str = "q_v", disable: bool | None = None) -> None:
        from tqdm.auto import tqdm

        self.desc = desc
        self.bar = tqdm(total=int(total), desc=desc, leave=False, dynamic_ncols=True, disable=disable, unit="it")

    def on_level(self, level: int, no_levels: int, shape: tuple[int, ...], no_iters: int) -> None:
        self.bar.set_description(f"{self.desc} level {level + 1}/{no_levels} {'x'.join(map(str, shape))}", refresh=False)

    def __call__(self, iteration: int, loss: Tensor) -> None:
        if self.bar.disable:
            return
        self.bar.n = iteration + 1
        self.bar.set_postfix(loss=f"{float(loss.float().mean()):.5g}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adam_q_v(params: list[Tensor], lr: float) -> torch.optim.Optimizer | FusedAdam:
    """The default q_v optimiser: Adam, fused on CPU and CUDA (one pass per parameter for the whole update; 8x
    faster than foreach on a busy 2-core CPU), as :class:`~learnsim.fused_adam.FusedAdam` (the same iterates as
    ``torch.optim.Adam(fused=True)`` without its start-up cost); ``torch.optim.Adam`` on other devices."""
    if params[0].device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params):
        return FusedAdam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


class VariationalRegistration:
    """Fit q_v for batches of pairs and draw transformations from it.

    Args:
        metric: the similarity metric (baseline or learnt); frozen during fitting.
        transformation: :class:`~learnsim.transformation.SVF` or ``SVFFD``.
        reg: the regulariser (``0.5 w_reg ||grad v||^2``).
        sobolev: Sobolev smoother of the samples (identity backward).
        no_iters: Adam steps per fit.
        lr: Adam learning rate for q_v (config ``q_v.lr``).
        sigma_init, u_init, rank: q_v initialisation (0.5, 0.1, 1 in the original).
        uniform_noise: magnitude ``a`` of the U(-a, a) voxel noise added to the sampling coordinates after
            integration while *training* (0 disables); never used at test time.
        amp: run the energies in bf16 autocast on CUDA (parameters and integration stay fp32).
        levels: pyramid levels used by :meth:`fit_levels` (1: the single-level :meth:`fit`).
        level_iters, level_lr: per-level Adam steps and learning rates of :meth:`fit_levels`, coarsest first
            (None: ``no_iters`` / ``lr`` at every level). :meth:`fit` itself always runs one level.
        optimizer: q_v optimiser factory ``optimizer(params, lr=lr) -> Optimizer`` (e.g. a Hydra partial of a
            ``torch.optim`` class), called afresh for every fit: each batch of pairs starts Adam from scratch, as
            in the original. Default :func:`adam_q_v`.
        likelihood: learn the likelihood precision inside every fit (``data_weight="auto"``;
            :mod:`learnsim.likelihood`): a :class:`~learnsim.likelihood.LikelihoodLearning`, or its config mapping
            (``per_pair: false`` or None: the metric's fixed weight). The prior's mean defaults to the metric's weight.
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
        levels: int = 1,
        level_iters: Sequence[int] | None = None,
        level_lr: Sequence[float] | None = None,
        optimizer: OptimizerFactory | None = None,
        likelihood: LikelihoodLearning | Any = None,
    ) -> None:
        self.metric = metric
        self.transformation = transformation
        self.reg = reg
        self.sobolev = sobolev
        self.no_iters = int(no_iters)
        if self.no_iters < 1:
            raise ValueError(f"q_v.no_iters must be an integer >= 1; got {no_iters}")
        self.lr = float(lr)
        self.sigma_init = float(sigma_init)
        self.u_init = float(u_init)
        self.rank = int(rank)
        self.uniform_noise = float(uniform_noise)
        self.amp = bool(amp)
        self.schedule = LevelSchedule.make(levels, self.no_iters, self.lr, level_iters, level_lr)
        self.optimizer = optimizer if optimizer is not None else adam_q_v
        if likelihood is not None and not isinstance(likelihood, LikelihoodLearning):
            cfg = dict(likelihood)
            likelihood = (LikelihoodLearning.from_config(cfg, metric.energy.weight)
                          if cfg.pop("per_pair", False) else None)
        if likelihood is not None and isinstance(metric.energy, StudentT):
            raise ValueError("data_weight='auto' (likelihood.per_pair) needs a Gaussian energy (ssd, lcc, cnn_ssd, "
                             "cnn_lcc); a Student-t metric keeps the precision it learnt in training")
        self.likelihood: LikelihoodLearning | None = likelihood
        # per-pair multiplier of the data term [B] while a learnt precision is in force (None: the metric's weight)
        self._data_scale: Tensor | None = None
        self._estimate: PrecisionEstimate | None = None
        self._lik_images: tuple[Tensor, Tensor, Tensor | None] | None = None

    @classmethod
    def paper(cls, metric: SimilarityMetric | str = "ssd", *, w_reg: float | None = None,
              transformation: SVF | None = None, sobolev: SobolevSmoother | None = None,
              **kwargs: Any) -> VariationalRegistration:
        """The paper's q_v fit for ``metric``'s energy (:data:`learnsim.defaults.PAPER`), any setting overridden.

        Args:
            metric: a :class:`~learnsim.metric.SimilarityMetric`, or ``"ssd"`` / ``"lcc"`` (the baselines) or
                ``"cnn_ssd"`` / ``"cnn_lcc"`` (untrained learnt metrics).
            w_reg: the regulariser weight (default the paper's: SSD 1.8, LCC 2.8).
            transformation: default ``SVF(12)``; sobolev: default ``SobolevSmoother(True, 3, 0.5)``.
            kwargs: any other constructor argument (``no_iters``, ``lr``, ``uniform_noise``, ``levels``, ...).
        """
        from learnsim.defaults import PAPER
        from learnsim.metric import build_metric

        if isinstance(metric, str):
            metric = build_metric(metric)
        p = PAPER[metric.energy_kind]
        settings: dict[str, Any] = dict(no_iters=p.no_iters, lr=p.lr, sigma_init=p.sigma_init, u_init=p.u_init,
                                        rank=p.rank, uniform_noise=p.uniform_noise)
        settings.update(kwargs)
        return cls(
            metric,
            SVF(p.no_steps) if transformation is None else transformation,
            RegLossL2(p.w_reg if w_reg is None else w_reg),
            SobolevSmoother(True, p.sobolev_s, p.sobolev_lambda) if sobolev is None else sobolev,
            **settings,
        )

    # ------------------------------------------------------------------------------------------------ q_v
    def init_params(self, batch: int, shape: Sequence[int], device: torch.device | None = None) -> LowRankParams:
        """Fresh q_v for ``batch`` pairs on an image grid ``shape``."""
        return init_q_v(batch, self.transformation.param_shape(shape), self.sigma_init, self.u_init, self.rank, device)

    def displacement(self, params_sample: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Smoothed velocity and displacement of a parameter sample: ``([B,3,D,H,W], [B,3,D,H,W])`` voxels."""
        with stage("smoothing"):
            v = self.transformation.velocity(self.sobolev(params_sample), shape)
        with stage("integration"):
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
        return disp + noise.mul_(2).sub_(1).mul_(self.uniform_noise)  # in place: no extra full-size fields

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
        with stage("sampling"):
            pair, entropy = antithetic_pair(params, generator)
        v, disp = self.displacement(pair, shape)
        if training:
            # antithetic halves get independent noise, drawn from the same per-pair generators
            disp = self.add_coordinate_noise(disp, generator, chunks=2)
        with self._autocast(moving.device):
            with stage("warp"):
                warped = warp(moving if b == 1 else moving.repeat(2, 1, 1, 1, 1), disp)  # [1, ...] broadcasts
            with stage("energy"):
                feat_warped = self.metric.features(warped)
                ff, m = _doubled(feat_fixed, mask)
                data = self.metric.energy_from_features(ff, feat_warped, m).to(v.dtype)
        if self._data_scale is not None:  # the learnt precision over the metric's own weight, per pair
            data = data * self._data_scale.repeat(2)
        with stage("regulariser"):
            energy = data + self.reg(v)
        return energy.view(2, b).mean(0) - entropy

    @contextlib.contextmanager
    def _frozen_metric(self) -> Iterator[None]:
        """The metric in eval mode with no gradients into its weights; restored afterwards."""
        was_training = self.metric.training
        self.metric.eval()
        requires = [p.requires_grad for p in self.metric.parameters()]
        for p in self.metric.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, r in zip(self.metric.parameters(), requires, strict=True):
                p.requires_grad_(r)
            self.metric.train(was_training)

    def fit(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        params: LowRankParams | None = None,
        no_iters: int | None = None,
        training: bool = False,
        progress: ProgressFn | None = None,
        log_every: int = 0,
        generator: Generators = None,
        lr: float | None = None,
    ) -> FitResult:
        """Fit q_v for a batch of pairs with the metric frozen (one level: the images' own grid).

        Args:
            fixed: ``[1 or B, 1, D, H, W]`` fixed image(s) in [0, 1].
            moving: ``[B, 1, D, H, W]`` moving images in [0, 1].
            mask: fixed-image mask ``[1 or B, 1, D, H, W]`` (energies are summed inside it) or None.
            params: warm start (e.g. the pair's stored state); fresh initialisation if None.
            no_iters: overrides ``self.no_iters``.
            training: training mode (uniform coordinate noise on).
            progress: called as ``progress(iteration, loss_per_pair)`` every ``log_every`` iterations; the
                loss is a device tensor (no host sync unless the callback reads it).
            generator: one generator, one per pair (reproducible per pair), or None (global RNG).
            lr: overrides ``self.lr``.
        Returns:
            :class:`FitResult` with detached parameters.
        """
        if moving.dim() != 5 or moving.shape[1] != 1:
            raise ValueError(f"fit: moving must be [B, 1, D, H, W]; got {tuple(moving.shape)}")
        if fixed.shape[2:] != moving.shape[2:]:
            raise ValueError(f"fit: fixed grid {tuple(fixed.shape[2:])} != moving grid {tuple(moving.shape[2:])}")
        start = time.perf_counter()
        b, device = moving.shape[0], moving.device
        if params is None:
            params = self.init_params(b, moving.shape[2:], device)
        leaves = [t.detach().clone().requires_grad_(True) for t in params.tensors()]
        optimizer = self.optimizer(leaves, lr=self.lr if lr is None else float(lr))
        history: list[tuple[int, Tensor]] = []
        # the metric is frozen here: a(F) once, and no gradients into the metric's weights
        with self._frozen_metric(), self._learning_precision(b, device, fixed, moving, mask):
            with torch.no_grad(), self._autocast(device), stage("energy"):
                feat_fixed = self.metric.features(fixed).float()
            loss = torch.zeros(b, device=device)
            for it in range(no_iters if no_iters is not None else self.no_iters):
                if self._estimate is not None and it % self.likelihood.update_every == 0:
                    with stage("likelihood"):
                        self._update_precision(LowRankParams(*leaves), it)
                loss = self._step(LowRankParams(*leaves), optimizer, feat_fixed, moving, mask, training, generator)
                if log_every and (it % log_every == 0):
                    history.append((it, loss))
                    if progress is not None:
                        progress(it, loss)
                if (it + 1) % CHECK_EVERY == 0:
                    check_loss(loss, it)  # a diverged fit stops here (learnsim.divergence)
            check_fit(loss, leaves, no_iters if no_iters is not None else self.no_iters)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return FitResult(LowRankParams(*leaves).detach(), loss, time.perf_counter() - start, history,
                             self._estimate)

    # ------------------------------------------------------------------------------------- learnt precision
    @contextlib.contextmanager
    def _learning_precision(self, batch: int, device: torch.device, fixed: Tensor, moving: Tensor,
                            mask: Tensor | None) -> Iterator[None]:
        """While inside, :meth:`fit` updates the precision every ``likelihood.update_every`` steps (no-op when
        ``likelihood`` is None); the estimate is the fit's :attr:`FitResult.precision`. ``fixed``, ``moving`` and
        ``mask`` are the image-grid tensors: the residual is always measured there, with a coarse level's q_v
        transferred to it, because the precision belongs to the images' noise (a coarse level sees smoothed
        images, whose residual would claim a far larger precision) and every level weighs the same functional
        (:mod:`learnsim.pyramid`)."""
        if self.likelihood is None or self._estimate is not None:  # not learnt, or an outer fit_levels learns it
            yield
            return
        w0 = torch.full((batch,), float(self.metric.energy.weight), device=device)
        self._estimate = PrecisionEstimate(w0.clone(), w0.clone(), torch.ones_like(w0))
        self._level = 0
        with torch.no_grad(), self._frozen_metric(), self._autocast(device):
            self._lik_images = (self.metric.features(fixed).float(), moving, mask)
        try:
            yield
        finally:
            self._estimate, self._data_scale, self._lik_images = None, None, None

    @torch.no_grad()
    def residual_statistics(self, q: LowRankParams, feat_fixed: Tensor, moving: Tensor, mask: Tensor | None,
                            likelihood: LikelihoodLearning, generator: Generators = None,
                            residual_map: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """What the likelihood learns from: ``(E_q[Q], n, alpha, r^2)`` per pair for q_v ``q`` on the images' grid.

        Args:
            q: q_v on ``moving``'s grid. feat_fixed: ``a(F)`` ``[1 or B, 1, D, H, W]``; moving ``[B, 1, D, H, W]``.
            likelihood: its ``samples`` antithetic pairs are averaged; its ``decimation`` gives ``alpha``.
            generator: for q_v's samples: one for the whole batch, one per pair, or None (global RNG).
            residual_map: also return the voxel-wise squared residual ``[B, 1, D, H, W]``, averaged over samples.
        Returns:
            ``quad`` ``[B]`` (``E_q[0.5 sum_mask r^2]``; NaN for a Student-t energy, which is not quadratic),
            ``count`` ``[B]`` (the mask's sum), ``alpha`` ``[B]`` and the map or None.
        """
        b, shape, dev = moving.shape[0], moving.shape[2:], moving.device
        ff, m = _doubled(feat_fixed, mask)
        numel = int(torch.tensor(shape).prod())
        quadratic = not isinstance(self.metric.energy, StudentT)
        quad, alpha = torch.zeros(b, device=dev), torch.zeros(b, device=dev)
        r2 = torch.zeros_like(moving) if residual_map else None
        with self._autocast(dev):
            for _ in range(likelihood.samples):
                pair, _ = antithetic_pair(q, generator)
                _, disp = self.displacement(pair, shape)
                fw = self.metric.features(warp(moving.repeat(2, 1, 1, 1, 1), disp)).float()
                if quadratic:
                    energy = self.metric.energy_from_features(ff, fw, m).float()
                    quad += residual_quadratic(self.metric, energy, m, numel).view(2, b).mean(0) / likelihood.samples
                alpha += likelihood.alpha((ff - fw)[:b], mask) / likelihood.samples
                if r2 is not None:
                    r2 += squared_residual_map(self.metric, ff, fw).view(2, b, *r2.shape[1:]).mean(0) / likelihood.samples
        count = mask.flatten(1).sum(1).float().expand(b) if mask is not None else torch.full((b,), float(numel),
                                                                                             device=dev)
        return (quad if quadratic else torch.full_like(quad, float("nan"))), count, alpha, r2

    @torch.no_grad()
    def _update_precision(self, q: LowRankParams, iteration: int) -> None:
        """One variational-Bayes update of the precision from ``E_{q_v}[Q]`` (:mod:`learnsim.likelihood`).

        q_v's samples come from a private generator (seeded by the update's position), so learning the precision
        draws nothing from the fit's own random stream: with a point-mass prior the fit is the fixed-weight one.
        """
        lik, est = self.likelihood, self._estimate
        assert lik is not None and est is not None and self._lik_images is not None
        feat_fixed, moving, mask = self._lik_images
        b, shape = moving.shape[0], moving.shape[2:]
        if tuple(q.loc.shape[2:]) != tuple(self.transformation.param_shape(shape)[1:]):
            q = upsample_q_v(q, shape)  # a coarse level's q_v on the image grid
        gen = torch.Generator(device=moving.device)
        gen.manual_seed(7919 * (len(est.history) + 1))
        quad, count, alpha, _ = self.residual_statistics(q, feat_fixed, moving, mask, lik, gen)
        expected = torch.as_tensor(lik.prior.expected(quad, count, alpha), device=moving.device).float().expand(b)
        weight = alpha * expected
        est.weight, est.expected, est.alpha = weight, expected, alpha
        est.history.append((self._level, iteration, weight.tolist()))
        self._data_scale = weight / float(self.metric.energy.weight)

    def _step(self, q: LowRankParams, optimizer: torch.optim.Optimizer, feat_fixed: Tensor, moving: Tensor,
              mask: Tensor | None, training: bool, generator: Generators) -> Tensor:
        """One Adam step on q_v's leaf tensors ``q``; returns the loss per pair ``[B]`` before the step (detached)."""
        loss = self.loss(q, feat_fixed, moving, mask, training, generator)
        optimizer.zero_grad(set_to_none=True)
        leaves = q.tensors()
        with stage("backward"):
            grads = torch.autograd.grad(loss.sum(), leaves)
            for leaf, g in zip(leaves, grads, strict=True):
                # autograd may hand back an expanded view; PyTorch's fused CPU Adam mishandles those: real strides
                leaf.grad = g.contiguous()
        with stage("optimiser"):
            optimizer.step()
        count_iterations()
        return loss.detach()

    def fit_levels(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        params: LowRankParams | None = None,
        schedule: LevelSchedule | None = None,
        training: bool = False,
        progress: ProgressFn | None = None,
        log_every: int = 0,
        generator: Generators = None,
        on_level: LevelFn | None = None,
    ) -> FitResult:
        """Coarse-to-fine q_v fit on an image pyramid (:mod:`learnsim.pyramid`); ``levels = 1`` is :meth:`fit`.

        Level ``l`` (0: coarsest, ``2^(L-1-l)`` times coarser than the images) runs ``schedule.iters[l]`` Adam steps
        at ``schedule.lr[l]`` (fresh Adam state per level) from the previous level's q_v transferred by
        :func:`~learnsim.pyramid.upsample_q_v`. The coarsest level starts from the initialisation expressed in the
        finest grid's voxels (``sigma_init`` and ``u_init`` divided by the coarsest level's voxel size in fine
        voxels): the same initial q_v in mm as a single-level fit. The last level is the images' grid.

        Args:
            fixed, moving, mask, training, generator: as :meth:`fit` (full-resolution tensors).
            params: warm start on the **full** grid: then only the finest level runs (a stored q_v already holds the
                coarse information); None: start from the initialisation on the coarsest grid.
            schedule: per-level iterations and learning rates (default: ``self.schedule``).
            progress: ``progress(iteration, loss_per_pair)`` with the iteration counted across all levels.
            on_level: called as ``on_level(level, no_levels, shape, no_iters)`` before each level runs.
        Returns:
            :class:`FitResult` on the full grid; ``history`` counts iterations across levels, ``seconds`` covers
            all levels (pyramid included).
        """
        with self._learning_precision(moving.shape[0], moving.device, fixed, moving, mask):
            return self._fit_levels(fixed, moving, mask, params, schedule, training, progress, log_every, generator,
                                    on_level)

    def _fit_levels(self, fixed: Tensor, moving: Tensor, mask: Tensor | None, params: LowRankParams | None,
                    schedule: LevelSchedule | None, training: bool, progress: ProgressFn | None, log_every: int,
                    generator: Generators, on_level: LevelFn | None) -> FitResult:
        sched = self.schedule if schedule is None else schedule
        if sched.levels == 1 or params is not None:
            n, rate = sched.iters[-1], sched.lr[-1]
            self._level = sched.levels - 1
            if on_level is not None:
                on_level(sched.levels - 1, sched.levels, tuple(moving.shape[2:]), n)
            with section(_level_name(sched.levels - 1, sched.levels, moving.shape[2:])):
                return self.fit(fixed, moving, mask, params, n, training, progress, log_every, generator, lr=rate)
        if type(self.transformation).param_shape is not SVF.param_shape:
            raise ValueError("q_v.levels > 1 needs a dense SVF transformation (transformation=svf)")
        if moving.dim() != 5 or moving.shape[1] != 1:
            raise ValueError(f"fit_levels: moving must be [B, 1, D, H, W]; got {tuple(moving.shape)}")
        start = time.perf_counter()
        with stage("pyramid"):
            pyr = Pyramid(fixed, moving, mask, sched.levels)
        history: list[tuple[int, Tensor]] = []
        done = 0
        q: LowRankParams | None = None
        fit: FitResult | None = None
        for level, shape in enumerate(pyr.shapes):
            with stage("pyramid"):
                q = (self._coarse_init(moving.shape[0], shape, tuple(moving.shape[2:]), moving.device) if q is None
                     else upsample_q_v(q, shape))
            n = sched.iters[level]
            if on_level is not None:
                on_level(level, sched.levels, tuple(shape), n)

            def shifted(it: int, loss: Tensor, offset: int = done) -> None:
                if progress is not None:
                    progress(offset + it, loss)

            f, m, k = pyr.level(level)
            self._level = level
            with section(_level_name(level, sched.levels, shape)):
                fit = self.fit(f, m, k, q, n, training, shifted, log_every, generator, lr=sched.lr[level])
            history += [(done + it, loss) for it, loss in fit.history]
            q = fit.params
            done += n
        assert fit is not None
        return FitResult(fit.params, fit.loss, time.perf_counter() - start, history, fit.precision)

    def _coarse_init(self, batch: int, shape: Sequence[int], fine: Sequence[int], device: torch.device) -> LowRankParams:
        """:meth:`init_params` on the coarse grid ``shape``, scaled so that it is the same q_v in mm as on ``fine``."""
        p = self.init_params(batch, shape, device)
        s = torch.tensor([f / c for f, c in zip(fine, shape, strict=True)], device=device).view(1, 3, 1, 1, 1)
        return LowRankParams(p.loc, p.log_var - 2 * torch.log(s), p.u / s.unsqueeze(1))

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_warped(self, params: LowRankParams, moving: Tensor, generator: Generators = None,
                      training: bool = True) -> Tensor:
        """``moving`` warped by one draw from q_v per pair (the first of an antithetic pair), ``[B, 1, D, H, W]``.

        With ``training``, the coordinates get the U(-a, a) voxel noise of :meth:`add_coordinate_noise`, drawn
        from the same ``generator`` (the metric's q_phi / q_f step of the training module uses this).
        """
        v_sample, _ = antithetic_samples(params, generator)
        _, disp = self.displacement(v_sample, moving.shape[2:])
        if training:
            disp = self.add_coordinate_noise(disp, generator)
        return warp(moving, disp)

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


def _level_name(level: int, levels: int, shape: Sequence[int]) -> str:
    """``"level 2/3 64x64x64"``: a pyramid level as the profile names it (:mod:`learnsim.profiling`)."""
    return f"level {level + 1}/{levels} {'x'.join(str(int(n)) for n in shape)}"


def _doubled(feat_fixed: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``a(F)`` and the mask for an antithetic pair of samples stacked on the batch axis (``[2B, ...]``): a shared
    ``[1, ...]`` tensor broadcasts as it is, a per-pair ``[B, ...]`` one is repeated."""
    ff = feat_fixed if feat_fixed.shape[0] == 1 else feat_fixed.repeat(2, 1, 1, 1, 1)
    m = mask if (mask is None or mask.shape[0] == 1) else mask.repeat(2, 1, 1, 1, 1)
    return ff, m
