r"""LearnSimModule: learning the similarity metric jointly with each pair's q_v (manual optimisation).

Three optimisers: ``q_f`` (image distribution) and ``q_phi`` (metric weights) are Lightning's, in this order;
``q_v``'s (per-pair velocity posteriors) is built afresh for every batch by the registration (its factory, the
``registration`` config group's ``optimizer``), so its Adam state never reaches a checkpoint. Each training step

1. loads the batch's q_v from the per-pair state store (warm start across epochs; fresh on the first epoch),
2. fits q_v with the metric frozen (:class:`~learnsim.registration.VariationalRegistration`): coarse-to-fine on
   the first epoch, ``no_iters_warm`` steps from the stored state after it (see "Training budget" below),
3. stores q_v back (asynchronously), and
4. takes one step of q_phi and q_f on the contrastive objective below.

Where the q_phi / q_f objective comes from
------------------------------------------
The likelihood is ``p(F | M, v, phi) = exp(-E_phi(F, M o phi_v)) / Z(phi)`` with
``Z(phi) = \int exp(-E_phi(F', M o phi_v)) dF'``. The ELBO, per pair, is

    ELBO(q_v, phi) = E_{q_v}[ -E_phi(F, M o phi_v) - log Z(phi) - R(v) ] + H(q_v).

``log Z`` is intractable. For any density ``q_f`` over images, Jensen's inequality gives the lower bound

    log Z(phi) = log E_{q_f}[ exp(-E_phi(F')) / q_f(F') ] >= E_{q_f}[ -E_phi(F') ] + H(q_f).

Substituting the bound for ``log Z`` (which makes the objective an approximation, not a bound, of the ELBO),
the terms that depend on ``phi`` give the loss minimised by q_phi:

    L_phi = E_{q_v}[ E_phi(F, M o phi_v) - E_{q_f}[ E_phi(F', M o phi_v) ] ],

estimated with one q_v sample per pair and an antithetic pair ``F'_1, F'_2`` of q_f samples:
``[E(F, Mw) - 0.5 E(F'_1, Mw) - 0.5 E(F'_2, Mw)] / n`` (``n`` = pairs in the batch). It lowers the energy of
the real atlas against "fixed-like" images drawn from q_f.

How q_f is trained (``q_f_objective``):

* ``"original"`` (default, what the original code does): q_f minimises the same ``L_phi``. Its gradient raises
  ``E_phi(F')`` of q_f's samples: q_f moves to images that the current metric finds *least* similar, a
  contrastive/adversarial sampler, with no entropy term.
* ``"bound"``: q_f tightens the Jensen bound, i.e. maximises ``E_{q_f}[-E_phi(F')] + H(q_f)``: it minimises
  ``E_{q_f}[E_phi(F', Mw)] - H(q_f)``, moving q_f towards the Gibbs distribution ``exp(-E_phi) / Z`` (the bound
  is tight when ``q_f`` equals it). This is the variationally consistent choice.

Why ``L_phi`` is unbounded, and the bounded objective (``metric.normalise``)
-------------------------------------------------------------------------------
Rescale the features, ``a -> k a``. Every SSD energy is quadratic in ``a``, so ``E -> k^2 E`` and
``L_phi -> k^2 L_phi``: once q_v has fitted, the atlas is closer to ``Mw`` than q_f's samples are (``L_phi < 0``)
and ``L_phi`` decreases without bound as ``k`` grows. Nothing in the surrogate resists: the exact objective keeps
``-log Z(phi)``, which for a linear ``a = A`` is ``log |det A| + const = n log k + ...`` (``n`` voxels) and grows
as fast as the energies fall, but the Jensen bound replaces ``log Z`` by ``-E_{q_f}[E_phi(F')] + H(q_f)``, which
has no such term. Gradient steps on ``phi`` therefore inflate the metric's scale (LCC is invariant to the scale up
to its ``1e-5``, so this is SSD's failure), which acts as an ever larger likelihood precision for q_v.

``metric.normalise: true`` fixes the scale by construction: the energy compares ``c a(.)`` with

    c(phi) = rms_mask(F) / rms_mask(a_phi(F)),

the RMS of the atlas' features inside its mask brought back to the atlas' own RMS (:mod:`learnsim.metric`).

* Scale invariance: ``a -> k a`` gives ``c -> c / k``; ``c a`` and every energy are unchanged, so ``L_phi`` has no
  descent direction along the scale. ``c`` is differentiated in the q_phi step (it depends on ``phi`` through
  ``a(F)``) and frozen, as a buffer set on the atlas, while q_v is fitted.
* Anchor kept: at the Dirac initialisation ``a(F) = F`` on [0, 1] images, so ``c = 1`` and the energy and its
  gradient in ``v`` are exactly SSD's / LCC's.
* Bounded: for a linear ``a = h *`` (a filter) and q_f's zero-mean perturbation ``n = F' - F`` independent of
  the residual ``r = F - Mw``, ``E_{q_f}[E(F', Mw)] = E(F, Mw) + 0.5 w c^2 E||h * n||^2``, hence
  ``E_{q_f}[L_phi] = -0.5 w ||F||^2 E||h * n||^2 / ||h * F||^2 >= -0.5 w ||F||^2 max_omega S_n / S_F`` (power
  spectra of ``n`` and ``F``; norms inside the mask): finite, and attained by the filter that passes the
  frequencies where q_f's samples differ from the atlas most relative to the atlas itself. The nonlinear
  encoder has no such closed form, but the direction that made the original diverge is gone.

What the objective can learn (both variants). q_f's mean is the atlas (not learnt), so for linear features the
residual cancels: ``E_{q_f}[E(F', Mw)] = E(F, Mw) + 0.5 w c^2 E||h * n||^2`` and ``E_{q_f}[L_phi]`` does not
depend on the moving images at all. The metric learns to amplify q_f's perturbation relative to the atlas (a
high-pass map for white noise), whatever the pairs; only the encoder's nonlinearity and the clamping of q_f's
samples let the pairs in. Tightening the bound does not change that: the optimal diagonal q_f
(``q_f.objective=bound``, ``sigma^2 = 1 / (w c^2 ||h||^2)``) turns the surrogate into
``-(n / 2) log(w c^2 ||h||^2) + const``, again unbounded in the unnormalised gain. The exact objective,
``E(F, Mw) + log Z = 0.5 w ||c h * r||^2 - log |det(c h)| + const`` (``r = F - Mw``), would learn the filter that
whitens the registration residual, ``|c H(omega)|^2 = 1 / (w |R(omega)|^2)``; only ``log Z``'s log-determinant,
which the Jensen surrogate drops, carries that information.

``q_f.objective: logdet`` takes that route for the linear part: ``L_phi = E(F, Mw) - s log |det(c A)|`` with ``A``
the encoder with LeakyReLU as the identity (exact at the Dirac initialisation), its log-determinant summed over
the grid's frequencies (:meth:`~learnsim.metric.SimilarityMetric.linear_log_det`) and ``s`` the mask's share of
the grid (the energy sums over the mask). It is bounded in the scale (``k^2 E`` against ``n log k``: unnormalised,
the scale settles at the maximum-likelihood precision of the residual) and in the spectrum (per frequency
``0.5 w |cH|^2 |R|^2 - log |cH|``); q_f is not used.

``metric.normalise: false`` (default; the paper experiments ``+experiment=ssd|lcc``) keeps the original objective
for comparison. The module logs the scale each step and epoch: ``metric/feature_scale`` (``c``),
``metric/raw_feature_rms`` (``rms_mask(a(F))``, the scale the original lets grow), ``metric/energy_ratio`` (the
learnt energy of ``(F, Mw)`` over the baseline's) and the aggregation weights.

Training budget
---------------
The first fit of a pair (epoch 0: no stored q_v) runs the coarse-to-fine schedule
(:meth:`~learnsim.registration.VariationalRegistration.fit_levels`, ``q_v.levels`` > 1); later epochs start from
the stored q_v at full resolution and run ``no_iters_warm`` steps (``q_v.no_iters_warm``; None: ``no_iters``,
the paper's). Validation pairs use the test's schedule (fresh q_v, coarse-to-fine when ``levels`` > 1).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from learnsim.checkpoint import ATLAS_KEY, MODULE_KEY, ModuleKind, atlas_digest
from learnsim.distributed import average_gradients
from learnsim.distributions import QF
from learnsim.grid import as_dims
from learnsim.likelihood import ResidualHistogram
from learnsim.likelihood_training import PopulationLikelihood
from learnsim.metric import SimilarityMetric, masked_rms
from learnsim.registration import VariationalRegistration
from learnsim.spatial import warp_labels
from learnsim.state import QVStateStore

__all__ = ["LearnSimModule", "QFObjective"]

OptimFactory = Callable[..., torch.optim.Optimizer]
#: ``registration(metric=...)``: the ``registration`` config group instantiated as a partial
RegistrationFactory = Callable[..., VariationalRegistration]


class QFObjective(str, Enum):
    """How q_f is trained (see the module docstring)."""

    ORIGINAL = "original"
    BOUND = "bound"
    #: no q_f: ``log Z`` is the exact Gaussian normaliser of the metric's linear part (module docstring)
    LOGDET = "logdet"


def _adam(lr: float) -> OptimFactory:
    import functools

    return functools.partial(torch.optim.Adam, lr=lr)  # picklable, for spawned DDP processes


class LearnSimModule(pl.LightningModule):
    """Variational similarity learning (Grzech et al., CVPR 2022) as a LightningModule.

    Args:
        metric: the similarity metric to learn (CNN_SSD / CNN_LCC; a baseline gives q_phi nothing to learn).
        registration: the q_v fit (:class:`~learnsim.registration.VariationalRegistration` of ``metric``), or a
            factory ``registration(metric=metric)`` (the ``registration`` config group, a Hydra partial). Its
            ``no_iters`` Adam steps run per training batch, its optimiser factory builds q_v's Adam afresh each time.
        dims: image grid ``(D, H, W)`` or one int for a cube (to size q_f before the data are seen; the atlas is
            copied in at setup).
        q_f: dict with ``sigma_init`` (0.1), ``u_init`` (0.1), ``rank`` (1), ``loc_learnable`` (False),
            ``cov_learnable`` (True), ``objective`` (:class:`QFObjective`, ``"original"`` or ``"bound"``).
        optimizer_q_f, optimizer_q_phi: factories ``params -> Optimizer`` (Hydra partials); Adam with lr 1e-3 and
            1e-5 by default.
        state_dir: folder of the per-pair q_v states (default: ``<trainer.default_root_dir>/q_v_state``).
        state_dtype: storage dtype of the q_v states (``float16``).
        log_period: q_v iterations between logged losses (and progress-bar postfix updates).
        no_iters_val: q_v iterations for validation pairs (fresh q_v, frozen metric) when ``levels`` is 1; with
            ``levels`` > 1 validation runs the coarse-to-fine schedule, as the test does.
        no_iters_warm: q_v iterations of a batch whose q_v is warm-started from the state store (after epoch 0);
            None: the registration's ``no_iters`` (the paper's schedule).
        seed: random draws (q_v samples, coordinate noise) come from one generator per pair seeded by
            ``(seed, epoch, pair index)``, and q_f's from ``(seed, epoch, batch index)``: a run is reproducible and
            does not depend on the batch size or the number of DDP processes.
        likelihood: the ``likelihood`` config; ``learn: true`` learns one precision (``noise: student_t``: and
            ``nu``) over the training pairs from ``metric.energy.weight`` (:mod:`learnsim.likelihood_training`),
            updated after every batch, stored in checkpoints, logged as ``likelihood/*``.
    """

    def __init__(
        self,
        metric: SimilarityMetric,
        registration: VariationalRegistration | RegistrationFactory,
        dims: int | tuple[int, int, int] | list[int] = (64, 64, 64),
        q_f: dict | None = None,
        optimizer_q_f: OptimFactory | None = None,
        optimizer_q_phi: OptimFactory | None = None,
        state_dir: str | None = None,
        state_dtype: str = "float16",
        log_period: int = 512,
        no_iters_val: int | None = None,
        structures: list[int] | None = None,
        seed: int = 0,
        no_iters_warm: int | None = None,
        likelihood: dict | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.metric = metric
        if not isinstance(registration, VariationalRegistration):
            registration = registration(metric=metric)
        if registration.metric is not metric:
            raise ValueError("LearnSimModule: the registration must fit q_v with the module's metric")
        self.registration = registration
        # submodules of the module (device moves, state dict keys), shared with the registration
        self.transformation, self.reg_loss, self.sobolev = registration.transformation, registration.reg, registration.sobolev
        self.dims = as_dims(dims)
        q_f = dict(q_f or {})
        objective = str(q_f.pop("objective", QFObjective.ORIGINAL.value))
        if objective not in tuple(QFObjective):
            raise ValueError(f"q_f.objective must be 'original', 'bound' or 'logdet'; got {objective!r}")
        self.q_f_objective = QFObjective(objective)
        self.q_f = QF(torch.zeros(1, 1, *self.dims), **q_f)
        self.no_iters_q_v = registration.no_iters
        self.no_iters_warm = int(no_iters_warm) if no_iters_warm is not None else self.no_iters_q_v
        if self.no_iters_warm < 1:
            raise ValueError(f"q_v.no_iters_warm must be an integer >= 1 or null; got {no_iters_warm}")
        self._opt_factories = (optimizer_q_f or _adam(1e-3), optimizer_q_phi or _adam(1e-5))
        self.state_dir = state_dir
        self.state_dtype = state_dtype
        self.state: QVStateStore | None = None
        self.log_period = int(log_period)
        self.no_iters_val = int(no_iters_val) if no_iters_val is not None else self.no_iters_q_v
        self.structures = list(structures) if structures else None
        self._atlas_set = False
        self.seed = int(seed)
        # training batches done by this rank, across epochs: each stored q_v state is tagged with it, and a resumed
        # run ignores (rolls back) states written at or after the checkpoint's count (learnsim.state)
        self.q_v_step = 0
        self._missing_states: list[str] = []
        # the metric must be rebuildable from the checkpoint alone (SimilarityMetric.from_checkpoint)
        self.save_hyperparameters({"metric_spec": metric.spec, "dims": list(self.dims)})
        self.population = PopulationLikelihood.from_config(likelihood, float(metric.energy.weight))
        if self.population is not None and self.population.noise == "student_t" and "nu" not in metric.spec:
            raise ValueError("likelihood.noise=student_t needs a Student-t metric (metric=ssd_t or cnn_ssd_t)")
        if self.population is not None and self.population.noise == "gaussian" and "nu" in metric.spec:
            raise ValueError("a Student-t metric learns with likelihood.noise=student_t")

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        root = Path(self.state_dir) if self.state_dir else Path(self.trainer.default_root_dir) / "q_v_state"
        if self.state is None:
            self.state = QVStateStore(root, self.state_dtype)
        self._make_val_metrics()
        if stage == "fit" and not self._atlas_set:
            atlas = _datamodule_atlas(getattr(self.trainer, "datamodule", None))
            if atlas is not None:
                self.set_atlas(atlas)

    def _make_val_metrics(self) -> None:
        """Validation metrics pooled over pairs across DDP ranks (:mod:`learnsim.evaluation.aggregate`): the same
        number on one process or many; their states are not saved in checkpoints. Imported here, not at module
        import: training without validation needs neither MONAI nor scipy."""
        if hasattr(self, "val_dsc"):
            return
        from learnsim.evaluation.aggregate import FoldingPercent, MeanASD, MeanDSC

        self.val_dsc = MeanDSC(self.structures).to(self.device)
        self.val_asd = MeanASD(self.structures).to(self.device)
        self.val_folding = FoldingPercent().to(self.device)

    @torch.no_grad()
    def set_atlas(self, fixed: Tensor) -> None:
        """Copy the atlas ``[1, 1, D, H, W]`` (or ``[1, D, H, W]``) into q_f's mean."""
        fixed = fixed.reshape(1, 1, *fixed.shape[-3:])
        if tuple(fixed.shape[2:]) != self.dims:
            raise ValueError(f"atlas grid {tuple(fixed.shape[2:])} != model dims {self.dims}")
        self.q_f.loc.copy_(fixed.to(self.q_f.loc))
        self._atlas_set = True
        self._atlas_digest = atlas_digest(fixed)  # saved in checkpoints: a resumed run notices a replaced atlas

    def configure_optimizers(self):
        f_params = [p for p in self.q_f.parameters() if p.requires_grad]
        phi_params = [p for p in self.metric.parameters() if p.requires_grad]
        # optimisers need at least one tensor: a baseline metric has no weights. q_v's optimiser is not here: the
        # registration builds one per batch (its Adam state belongs to that batch only, and stays out of checkpoints)
        placeholder = lambda: [torch.nn.Parameter(torch.zeros(1, device=self.device))]  # noqa: E731
        opt_f = self._opt_factories[0](f_params or placeholder())
        opt_phi = self._opt_factories[1](phi_params or placeholder())
        return [opt_f, opt_phi]

    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, *key)) & 0x7FFFFFFFFFFFFFFF)
        return g

    # ------------------------------------------------------------------------------------------ training
    def _inner_progress(self, total: int):
        bar = None
        if self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None and self.trainer.progress_bar_callback.is_enabled:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="q_v", leave=False, position=1, dynamic_ncols=True)
        every = max(1, min(self.log_period, 16))

        def update(it: int, loss: Tensor) -> None:
            if bar is not None:
                bar.n = it + 1
                if it % self.log_period == 0:
                    bar.set_postfix(loss=f"{loss.mean().item():.4g}", refresh=False)
                bar.refresh()

        return bar, update, every

    def _atlas(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The fixed image and its mask, ``[1, 1, D, H, W]`` each: the datamodule's atlas
        (:class:`learnsim.data.atlas.Atlas`), or, for a datamodule without one, the batch's first ``fixed``."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        atlas = getattr(dm, "atlas", None)
        if getattr(atlas, "image", None) is not None and getattr(atlas, "mask", None) is not None:
            return atlas.image.to(self.device), atlas.mask.to(self.device)
        return batch["fixed"][:1], batch["fixed_mask"][:1]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt_f, opt_phi = self.optimizers()
        fixed, mask = self._atlas(batch)
        moving = batch["moving"]
        if tuple(moving.shape[2:]) != self.dims:
            raise ValueError(f"batch grid {tuple(moving.shape[2:])} != model dims {self.dims}")
        if not self._atlas_set:
            self.set_atlas(fixed)
        self.metric.calibrate_(fixed, mask)  # c on this atlas for the current weights (a no-op unless normalised)
        indices = [int(i) for i in batch["index"]]
        gens = [self._generator(0, self.current_epoch, i) for i in indices]
        fit, found, iters = self._fit_q_v(batch, fixed, mask, indices, gens)
        if self.population is not None:
            self._learn_likelihood(batch, indices, fit.params, fixed, mask)

        # 4: one q_phi / q_f step on the contrastive objective (see the module docstring)
        warped = self.registration.sample_warped(fit.params, moving, gens)
        f1, f2 = self.q_f.sample_antithetic(self._generator(1, self.current_epoch, batch_idx))
        energies = self._contrastive_step(opt_f, opt_phi, fixed, mask, warped, f1, f2)
        energies["q_v_iters"] = torch.tensor(float(iters), device=self.device)
        self._log_training(fit.loss.mean(), found, energies, moving.shape[0])
        if batch_idx == 0:
            self._log_images(fixed, moving, warped, f1)
        return fit.loss.mean().detach()

    def _fit_q_v(self, batch: dict[str, Any], fixed: Tensor, mask: Tensor, indices: list[int],
                 gens: list[torch.Generator]):
        """Steps 1-3: q_v of this batch, warm-started from the state store, fitted and stored back.

        A batch with no stored q_v (epoch 0) runs the coarse-to-fine schedule when ``levels`` > 1; otherwise one
        level at full resolution, ``no_iters_warm`` steps if every pair was warm-started (``no_iters`` if not).
        Returns the fit, which pairs had a stored state (``[B]`` bool) and the q_v iterations run."""
        moving = batch["moving"]
        # the pair's identity (hash of its file paths) keys its q_v state; the row index only without one
        keys = list(batch["pair_key"]) if "pair_key" in batch else indices
        init = self.registration.init_params(moving.shape[0], moving.shape[2:], self.device)
        params, found = self.state.load(keys, init)
        if self.current_epoch > 0 or self._resumed:
            self._missing_states += [str(k) for k, hit in zip(keys, found.tolist(), strict=True) if not hit]
        reg = self.registration
        coarse_to_fine = not bool(found.any()) and reg.schedule.levels > 1
        n = sum(reg.schedule.iters) if coarse_to_fine else (self.no_iters_warm if bool(found.all()) else self.no_iters_q_v)
        bar, update, every = self._inner_progress(n)
        common = dict(training=True, progress=update, log_every=every, generator=gens)
        try:
            if coarse_to_fine:
                fit = reg.fit_levels(fixed, moving, mask, None, **common)
            else:
                fit = reg.fit(fixed, moving, mask, params, no_iters=n, **common)
        finally:
            if bar is not None:
                bar.close()
        self.state.save(keys, fit.params, step=self.q_v_step, epoch=self.current_epoch)
        self.q_v_step += 1
        return fit, found, n

    @torch.no_grad()
    def _learn_likelihood(self, batch: dict[str, Any], indices: list[int], params: Any, fixed: Tensor,
                          mask: Tensor) -> None:
        """The population precision after this batch's q_v fits (:mod:`learnsim.likelihood_training`): the pairs'
        residual statistics under their fitted q_v, then the metric's weight (and ``nu``) set from all pairs."""
        pop = self.population
        assert pop is not None
        keys = [str(k) for k in (batch["pair_key"] if "pair_key" in batch else indices)]
        reg = self.registration
        with reg._frozen_metric():
            feat_fixed = self.metric.features(fixed).float()
            gen = [self._generator(2, self.current_epoch, i) for i in indices]  # per pair: batch- and DDP-independent
            student = pop.noise == "student_t"
            quad, count, alpha, r2 = reg.residual_statistics(params, feat_fixed, batch["moving"], mask, pop.learning,
                                                             gen, residual_map=student)
        hists = ([ResidualHistogram().add(r2[i:i + 1], mask[:1] if mask.shape[0] == 1 else mask[i:i + 1])
                  for i in range(r2.shape[0])] if r2 is not None else None)
        mine = (keys, quad.tolist(), count.tolist(), alpha.tolist(), hists)
        for stats in _gathered(mine):  # every rank's pairs: one population precision on every rank (DDP)
            pop.add(*stats)
        self._apply_likelihood(pop.update())

    def _apply_likelihood(self, learnt: dict[str, float]) -> None:
        self.metric.set_weight_(learnt["data_weight"], precision=learnt["precision"])
        if self.population is not None and self.population.noise == "student_t":
            self.metric.set_nu_(min(learnt["nu"], 1e30))
        self.log_dict({f"likelihood/{k}": float(min(v, 1e30)) for k, v in learnt.items()}, on_step=True,
                      on_epoch=True, batch_size=1, sync_dist=False)

    def _contrastive_step(self, opt_f, opt_phi, fixed: Tensor, mask: Tensor, warped: Tensor, f1: Tensor,
                          f2: Tensor) -> dict[str, Tensor]:
        """One step of q_phi and q_f: ``L_phi = [E(F, Mw) - (E(F'_1, Mw) + E(F'_2, Mw)) / 2] / n`` (module
        docstring); q_f minimises ``L_phi`` (``original``) or ``E_{q_f}[E(F', Mw)] - H(q_f)`` (``bound``).
        With a normalised metric the features are ``c a(.)``, ``c`` differentiated through ``a(F)``.
        Returns the energies, losses and the metric's scale ``[B]`` / scalars, for logging."""
        b, metric = warped.shape[0], self.metric
        # one encoder pass per image (a batched pass reorders the weight gradients' sums: DDP runs must match)
        raw_fixed, raw_w, raw_1, raw_2 = (metric.raw_features(x) for x in (fixed, warped, f1, f2))
        c = metric.atlas_scale(fixed, mask, raw_fixed)
        feat_w = c * raw_w
        e_fixed = metric.energy_from_features(c * raw_fixed, feat_w, mask)
        e_1 = metric.energy_from_features(c * raw_1, feat_w, mask)
        e_2 = metric.energy_from_features(c * raw_2, feat_w, mask)
        loss_phi = (e_fixed - 0.5 * e_1 - 0.5 * e_2).sum() / b
        loss_f: Tensor | None = loss_phi
        if self.q_f_objective is QFObjective.BOUND:
            loss_f = 0.5 * (e_1 + e_2).sum() / b - self.q_f.entropy()
        elif self.q_f_objective is QFObjective.LOGDET:  # E(F, Mw) + log Z, log Z over the mask's share of the grid
            share = mask.float().mean() if mask is not None else 1.0
            loss_phi, loss_f = e_fixed.sum() / b - share * metric.linear_log_det(fixed.shape[2:], c), None
        self._step_phi_and_f(opt_f, opt_phi, loss_phi, loss_f)
        metric.calibrate_(fixed, mask)  # the stored c follows the new weights (q_v fits and checkpoints use it)
        with torch.no_grad():
            e_base = metric.energy(fixed, warped, mask)
            scale = {"feature_scale": c.detach(), "raw_feature_rms": masked_rms(raw_fixed.detach(), mask),
                     "energy_ratio": _energy_ratio(metric, e_fixed.detach(), e_base, mask, warped[0, 0].numel())}
        return {"loss_phi": loss_phi.detach(), "loss_f": (loss_f if loss_f is not None else torch.zeros(())).detach(),
                "e_fixed": e_fixed.detach(),
                "e_q_f": (0.5 * (e_1 + e_2)).detach(), "e_base": e_base, **scale}

    def _step_phi_and_f(self, opt_f, opt_phi, loss_phi: Tensor, loss_f: Tensor | None) -> None:
        """Gradients of ``loss_phi`` into the metric's weights and of ``loss_f`` into q_f's (None: q_f stays);
        one step of each."""
        phi_params = [p for p in self.metric.parameters() if p.requires_grad]
        f_params = [p for p in self.q_f.parameters() if p.requires_grad] if loss_f is not None else []
        opt_f.zero_grad(set_to_none=True)
        opt_phi.zero_grad(set_to_none=True)
        if phi_params:
            _set_grads(phi_params, torch.autograd.grad(loss_phi, phi_params, retain_graph=bool(f_params), allow_unused=True))
        if f_params:
            _set_grads(f_params, torch.autograd.grad(loss_f, f_params, allow_unused=True))
        # gradients of the shared weights are averaged over ranks (the module is not DDP-wrapped on purpose)
        average_gradients(phi_params + f_params)
        if phi_params:
            opt_phi.step()
        if f_params:
            opt_f.step()
            self.q_f.clamp_()

    def _log_training(self, q_v_loss: Tensor, found: Tensor, energies: dict[str, Tensor], b: int) -> None:
        self.log_dict(
            {
                "train/q_v_loss": q_v_loss,
                "train/q_phi_loss": energies["loss_phi"],
                "train/q_f_loss": energies["loss_f"],
                "train/energy_fixed": energies["e_fixed"].mean(),
                "train/energy_q_f": energies["e_q_f"].mean(),
                "train/energy_baseline": energies["e_base"].mean(),
                "train/q_f_sigma_mean": torch.exp(0.5 * self.q_f.log_var.detach()).mean(),
                "train/q_f_entropy": self.q_f.entropy().detach(),
                "train/q_v_warm_started": found.float().mean().to(self.device),
                "train/q_v_iters": energies["q_v_iters"],
                "metric/feature_scale": energies["feature_scale"],
                "metric/raw_feature_rms": energies["raw_feature_rms"],
                "metric/energy_ratio": energies["energy_ratio"],
            },
            on_step=True,
            on_epoch=True,
            prog_bar=False,
            batch_size=b,
            sync_dist=True,  # one small all-reduce per step, negligible next to the q_v loop
        )
        if self.metric.encoder is not None:
            w = self.metric.encoder.aggregation.weight.detach().flatten()
            self.log_dict({f"metric/aggregation_w{i}": w[i] for i in range(w.numel())}, on_step=False, on_epoch=True,
                          batch_size=b, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        dl = self.trainer.train_dataloader
        sampler = getattr(dl, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self.state is not None:
            self.state.flush()
        if self._missing_states:
            missing, self._missing_states = sorted(set(self._missing_states)), []
            warnings.warn(
                f"learnsim: no stored q_v state for {len(missing)} pair(s) in {self.state.root} during epoch "
                f"{self.current_epoch} (first: {missing[:3]}); they started from q_v's initialisation",
                RuntimeWarning, stacklevel=1,
            )

    def on_train_start(self) -> None:
        # states written at or after the checkpoint's step count (a run killed before its next checkpoint, an older
        # run in the same folder, a later epoch than an older epochNNN.ckpt) are ignored: the previous generation
        # is used, or q_v's initialisation with a warning
        self._resumed = self.q_v_step > 0
        self._check_resumed_atlas()
        if self.state is not None:
            stale = self.state.set_valid_before(self.q_v_step)
            if stale:
                where = "the checkpoint" if self._resumed else "this run, which starts from scratch"
                warnings.warn(
                    f"learnsim: {stale} q_v state file(s) in {self.state.root} were written after {where}; "
                    "they are ignored (rolled back to the state before, where there is one)",
                    RuntimeWarning, stacklevel=1,
                )

    _resumed = False
    _atlas_digest: str | None = None

    def _check_resumed_atlas(self) -> None:
        """On resume: if the datamodule's atlas is not the one the checkpoint was trained with (same path, new
        content), say so and make it q_f's mean (the checkpoint's q_f.loc holds the old atlas)."""
        atlas = _datamodule_atlas(getattr(self.trainer, "datamodule", None))
        if not self._resumed or atlas is None or self._atlas_digest in (None, atlas_digest(atlas)):
            return
        warnings.warn(
            "learnsim: the atlas differs from the one the checkpoint was trained with (replaced under the same "
            "path?); q_f's mean is set to the new atlas, the learnt metric and q_v states come from the old one",
            RuntimeWarning, stacklevel=1,
        )
        self.set_atlas(atlas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the states of this epoch must be on disk before the checkpoint that points at them
        checkpoint["q_v_step"] = int(self.q_v_step)
        if self.state is not None:
            self.state.flush()
            root = self.state.root.resolve()
            checkpoint["q_v_state_dir"] = str(root)
            ckpt_dir = self._ckpt_dir()
            if ckpt_dir is not None:  # found again after the run folder is moved
                checkpoint["q_v_state_relpath"] = os.path.relpath(root, ckpt_dir)
        checkpoint[MODULE_KEY] = ModuleKind.LEARNSIM.value
        # the learnt precision (and nu) live in the metric's spec: from_checkpoint rebuilds the metric with them
        checkpoint.setdefault("hyper_parameters", {})["metric_spec"] = dict(self.metric.spec)
        if self.population is not None:
            checkpoint["likelihood_population"] = self.population.state_dict()
        if self._atlas_digest is not None:
            checkpoint[ATLAS_KEY] = self._atlas_digest
        if getattr(self, "run_config", None) is not None:
            checkpoint["learnsim_config"] = self.run_config

    def _ckpt_dir(self) -> Path | None:
        cb = getattr(self._trainer, "checkpoint_callback", None) if self._trainer is not None else None
        dirpath = getattr(cb, "dirpath", None)
        return Path(dirpath).resolve() if dirpath else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.q_v_step = int(checkpoint.get("q_v_step", 0))
        self._atlas_set = True  # q_f.loc comes back with the state dict
        spec = (checkpoint.get("hyper_parameters") or {}).get("metric_spec") or {}
        if "weight" in spec:  # a learnt precision: resume from it
            self.metric.set_weight_(float(spec["weight"]), spec.get("precision"))
        if "nu" in spec and "nu" in self.metric.spec:
            self.metric.set_nu_(float(spec["nu"]))
        if self.population is not None and checkpoint.get("likelihood_population"):
            self.population.load_state_dict(checkpoint["likelihood_population"])
        self._atlas_digest = checkpoint.get(ATLAS_KEY)
        if self.state_dir is not None:
            return
        # the states beside the checkpoint first: a copied run folder must not write into the original's states
        candidates = []
        ckpt_path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if checkpoint.get("q_v_state_relpath") and ckpt_path:
            candidates.append(Path(ckpt_path).resolve().parent / checkpoint["q_v_state_relpath"])
        if checkpoint.get("q_v_state_dir"):
            candidates.append(Path(checkpoint["q_v_state_dir"]))
        root = next((c for c in candidates if c.is_dir()), None)
        if root is not None:
            self.state = QVStateStore(root, self.state_dtype)
        elif candidates:
            warnings.warn(
                f"learnsim: the checkpoint's q_v states are not found (looked in {', '.join(map(str, candidates))}); "
                "every pair restarts from q_v's initialisation (pass model.state_dir=... to point at them)",
                RuntimeWarning, stacklevel=1,
            )

    def teardown(self, stage: str) -> None:
        if self.state is not None:
            self.state.flush()

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._make_val_metrics()
        (fixed, mask), moving = self._atlas(batch), batch["moving"]
        with torch.enable_grad():
            if self.registration.schedule.levels > 1:  # the test's schedule: coarse-to-fine from scratch
                fit = self.registration.fit_levels(fixed, moving, mask, training=False)
            else:
                fit = self.registration.fit(fixed, moving, mask, no_iters=self.no_iters_val, training=False)
        disp = self.registration.mean_displacement(fit.params, moving.shape[2:])
        b, index = moving.shape[0], batch.get("index")
        self.log("val/q_v_loss", fit.loss.mean(), batch_size=b, sync_dist=True)
        self.val_folding.update(disp, index)
        self.log("val/folding_pct", self.val_folding, batch_size=b)
        if bool(batch["has_seg"].all()):
            warped_seg = warp_labels(batch["moving_seg"], disp)
            self.val_dsc.update(warped_seg, batch["fixed_seg"], batch["moving_seg"], index)
            self.val_asd.update(warped_seg, batch["fixed_seg"], batch["affine"], batch["moving_seg"], index)
            self.log("val/dsc", self.val_dsc, batch_size=b)
            self.log("val/asd_mm", self.val_asd, batch_size=b)

    # ------------------------------------------------------------------------------------------ logging
    def _log_images(self, fixed: Tensor, moving: Tensor, warped: Tensor, qf_sample: Tensor) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image") or not self.trainer.is_global_zero:
            return
        mid = fixed.shape[2] // 2
        with torch.no_grad():
            feats = self.metric.features(fixed)
        images = [t[0, 0, mid].detach().float().cpu().numpy() for t in (fixed, moving[:1], warped[:1], qf_sample, feats)]
        try:
            logger.log_image(key="train/images", images=images, caption=["atlas", "moving", "warped", "q_f sample", "a(atlas)"], step=self.global_step)
        except Exception:  # image logging is a convenience; never fail training over it
            pass


def _energy_ratio(metric: SimilarityMetric, e_metric: Tensor, e_base: Tensor, mask: Tensor | None,
                  numel: int) -> Tensor:
    """The energy ratio ``rho`` logged in training, the mean over the batch
    (:func:`learnsim.energy_ratio.quadratic_ratio`); a Student-t metric (not quadratic) logs the energies' ratio."""
    from learnsim.energies import StudentT
    from learnsim.energy_ratio import quadratic_ratio

    if isinstance(metric.energy, StudentT):
        return (e_metric / e_base).mean()
    return quadratic_ratio(metric, e_metric, e_base, mask, numel).mean()


def _gathered(obj: Any) -> list[Any]:
    """``obj`` from every DDP rank, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _set_grads(params: list[Tensor], grads: tuple[Tensor | None, ...]) -> None:
    """``p.grad = g`` (zeros for an unused parameter, so that every optimiser steps the same set)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g


def _datamodule_atlas(dm: Any) -> Tensor | None:
    """The atlas image ``[1, 1, D, H, W]`` a datamodule exposes (``dm.atlas``: an Atlas, or the former method)."""
    atlas = getattr(dm, "atlas", None) if dm is not None else None
    if atlas is None:
        return None
    image = getattr(atlas, "image", None)
    if image is not None:
        return image
    return atlas() if callable(atlas) else atlas
