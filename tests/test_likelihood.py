"""The learnt likelihood (issues 22 and 23): the Gamma update, the precision of known white noise, virtual
decimation, Student-t weights and nu, data_weight=auto against a fixed weight, the energy ratio and the matched
baseline, the checkpoint-on-ratio callback, and the precision learnt in training."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import optimize, special
from test_module import PhantomDataModule, make_trainer

from learnsim import api
from learnsim.energies import SSD, StudentT, ssd, student_t_energy
from learnsim.energy_ratio import energy_ratio, matched_precision
from learnsim.likelihood import (
    LikelihoodLearning,
    PrecisionPrior,
    ResidualHistogram,
    decimation_factor,
    fit_student_t,
    parse_data_weight,
    student_t_weights,
)
from learnsim.likelihood_training import PopulationLikelihood
from learnsim.metric import SimilarityMetric, build_metric
from learnsim.module import LearnSimModule
from learnsim.ratio_checkpoint import EnergyRatioCheckpoint
from learnsim.registration import VariationalRegistration
from learnsim.spatial import separable_filter


def _smooth_image(n: int = 16) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    return (0.5 + 0.3 * torch.cos(3 * x) * torch.sin(2 * y) * torch.cos(2 * z)).clamp(0, 1)[None, None]


# ------------------------------------------------------------------------------------------- Gamma update
@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_gamma_update_is_the_numeric_maximiser_of_the_elbo(alpha):
    """q(w) = Gamma(a, b) maximising E_q[log p(w) + alpha (n/2 log w - w Q)] + H[q], found numerically, equals the
    closed form a = a0 + alpha n / 2, b = b0 + alpha Q."""
    prior, n, quad = PrecisionPrior(mean=2.0, strength=3.0), 500.0, 4.2
    a0, b0 = prior.strength, prior.strength / prior.mean

    def neg_elbo(x: np.ndarray) -> float:
        a, b = np.exp(x)
        e_log_w, e_w = special.digamma(a) - np.log(b), a / b
        log_prior = (a0 - 1) * e_log_w - b0 * e_w
        loglik = alpha * (n / 2 * e_log_w - e_w * quad)
        entropy = a - np.log(b) + special.gammaln(a) + (1 - a) * special.digamma(a)
        return -(log_prior + loglik + entropy)

    res = optimize.minimize(neg_elbo, x0=np.log([10.0, 1.0]), method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    a_num, b_num = np.exp(res.x)
    a, b = prior.posterior(quad, n, alpha)
    assert a_num == pytest.approx(a, rel=1e-3) and b_num == pytest.approx(b, rel=1e-3)
    assert prior.expected(quad, n, alpha) == pytest.approx(a / b)
    # a weak prior: the maximum-likelihood precision n / (2 Q) = 1 / mean(r^2), whatever alpha
    assert PrecisionPrior(1.0, 1e-9).expected(quad, n, alpha) == pytest.approx(n / (2 * quad), rel=1e-6)
    # a point mass stays at its mean
    assert PrecisionPrior(7.0, math.inf).expected(quad, n, alpha) == 7.0


def test_prior_and_settings_are_validated():
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="prior_mean"):
            PrecisionPrior(mean=bad)
    with pytest.raises(ValueError, match="decimation"):
        LikelihoodLearning(decimation=1.5)
    with pytest.raises(ValueError, match="update_every"):
        LikelihoodLearning(update_every=0)
    assert parse_data_weight("auto") == "auto" and parse_data_weight("AUTO ") == "auto"
    assert parse_data_weight("30") == 30.0 and parse_data_weight(None) is None
    for bad in ("foo", -1, 0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="data_weight"):
            parse_data_weight(bad)


# ------------------------------------------------------------------------------------------- white noise
@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_learnt_precision_of_white_noise_is_one_over_sigma_squared(sigma):
    """A pair differing by white noise of std sigma (decimation 1): the first update, at q_v's initialisation
    (identity), learns 1 / sigma^2 within 10 %."""
    gen = torch.Generator().manual_seed(1)
    fixed = _smooth_image(16)
    moving = fixed + sigma * torch.randn(fixed.shape, generator=gen)
    lik = LikelihoodLearning(PrecisionPrior(1.0), decimation=1.0, update_every=1)
    out = api.register(fixed, moving, "ssd", data_weight="auto", likelihood=lik, histmatch=False, no_iters=1,
                       sigma_init=1e-6, u_init=0.0, no_samples=0, device="cpu")
    first = out.fit.precision.history[0]
    assert first[2][0] == pytest.approx(1 / sigma**2, rel=0.1)


def test_decimation_factor_is_one_for_white_noise_and_smaller_for_smooth_residuals():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, 24, 24, 24, generator=gen)
    assert float(decimation_factor(noise)) > 0.9
    smooth = separable_filter(noise, [0.25, 0.5, 0.25])
    a = float(decimation_factor(smooth))
    # a [1/4, 1/2, 1/4] filter gives lag-1 correlation 2/3 per axis: (1/3 / 5/3)^3 = 0.008
    assert a == pytest.approx((1 / 5) ** 3, rel=0.5)  # finite grid, replicate borders: rho ~ 0.64
    lik = LikelihoodLearning(decimation=0.4)
    assert torch.equal(lik.alpha(smooth, None), torch.tensor([0.4]))


# ------------------------------------------------------------------------------------------- Student-t
def test_student_t_weights_and_energy_gradient():
    r2 = torch.tensor([0.0, 0.01, 1.0])
    assert torch.equal(student_t_weights(r2, 100.0, math.inf), torch.ones(3))
    assert torch.allclose(student_t_weights(r2, 100.0, 4.0), 5.0 / (4.0 + 100.0 * r2))
    fixed = torch.rand(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    warped = torch.rand(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    weight, w, nu = 30.0, 50.0, 3.0
    e = student_t_energy(fixed, warped, None, weight, w, nu)
    (g,) = torch.autograd.grad(e.sum(), warped)
    r = warped.detach() - fixed
    tau = student_t_weights(r * r, w, nu)
    assert torch.allclose(g, weight * tau * r, rtol=1e-5, atol=1e-7)  # an IRLS-weighted SSD gradient
    # nu = inf is SSD exactly; a huge nu is SSD to first order
    assert torch.equal(StudentT(weight, math.inf)(fixed, warped), weight * ssd(fixed, warped))
    assert torch.allclose(StudentT(weight, 1e9, w)(fixed, warped), SSD(weight)(fixed, warped), rtol=1e-4)


def test_student_t_nu_and_precision_by_maximum_likelihood():
    rng = np.random.default_rng(0)
    w_true, nu_true = 100.0, 4.0
    r = rng.standard_t(nu_true, size=200_000) / math.sqrt(w_true)
    hist = ResidualHistogram().add(torch.from_numpy(r * r))
    w, nu = fit_student_t(hist)
    assert nu == pytest.approx(nu_true, rel=0.15) and w == pytest.approx(w_true, rel=0.1)
    gauss = ResidualHistogram().add(torch.from_numpy(rng.normal(0, 0.1, 200_000) ** 2))
    w_g, nu_g = fit_student_t(gauss)
    assert nu_g > 50 and w_g == pytest.approx(100.0, rel=0.05)
    # the histogram travels in checkpoints
    assert torch.equal(ResidualHistogram.from_state(hist.state()).counts, hist.counts)


def test_student_t_metric_round_trips_through_its_spec():
    metric = build_metric("ssd_t", weight=20.0, nu=5.0, precision=40.0)
    assert metric.spec["kind"] == "ssd_t" and isinstance(metric.energy, StudentT)
    again = SimilarityMetric.from_spec(metric.spec)
    assert (again.energy.weight, again.energy.nu, again.energy.precision) == (20.0, 5.0, 40.0)


# ------------------------------------------------------------------------------------------- auto vs fixed
def test_auto_with_a_point_mass_prior_is_the_fixed_weight_fit():
    gen = torch.Generator().manual_seed(2)
    fixed = _smooth_image(12)
    moving = (fixed.roll(1, dims=3) + 0.01 * torch.randn(fixed.shape, generator=gen)).clamp(0, 1)
    kw = dict(histmatch=False, levels=2, level_iters=[6, 4], level_lr=[0.05, 0.05], no_samples=2, device="cpu")
    fixed_out = api.register(fixed, moving, "ssd", data_weight=30.0, **kw)
    lik = LikelihoodLearning(PrecisionPrior(30.0, math.inf), decimation=1.0, update_every=3)
    auto_out = api.register(fixed, moving, "ssd", data_weight="auto", likelihood=lik, **kw)
    assert torch.equal(fixed_out.disp, auto_out.disp)
    assert torch.equal(fixed_out.samples, auto_out.samples)
    assert auto_out.fit.precision.weight.tolist() == [30.0]
    assert len(auto_out.fit.precision.history) == 4  # levels x ceil(iters / 3): 2 + 2


def test_auto_moves_the_precision_and_reports_it():
    fixed = _smooth_image(12)
    moving = fixed.roll(1, dims=3)
    out = api.register(fixed, moving, "ssd", data_weight="auto", histmatch=False, levels=2, level_iters=[10, 10],
                       no_samples=0, device="cpu")
    est = out.fit.precision
    assert est is not None and est.weight.item() > 1.0  # from the paper's 1 to the residual's precision
    assert {h[0] for h in est.history} == {0, 1}  # updated at both levels


# ------------------------------------------------------------------------------------------- energy ratio
@pytest.mark.parametrize("k", [0.5, 3.0])
def test_energy_ratio_of_a_scaled_dirac_metric_is_k_squared_and_the_matched_baseline_equals_it(k):
    torch.manual_seed(0)
    metric = build_metric("cnn_ssd", weight=7.0, init_noise=0.0)
    with torch.no_grad():
        metric.encoder.aggregation.weight.mul_(k)
    fixed = torch.rand(1, 1, 8, 9, 10)
    moving = torch.rand(2, 1, 8, 9, 10)
    disp = 0.7 * torch.randn(2, 3, 8, 9, 10)
    mask = (torch.rand(1, 1, 8, 9, 10) > 0.3).float()
    rho = energy_ratio(metric, fixed, moving, disp, mask)
    assert torch.allclose(rho, torch.full((2,), k * k), rtol=1e-4)
    from learnsim.spatial import warp

    warped = warp(moving, disp)
    matched = build_metric("ssd", weight=matched_precision(7.0, float(rho[0])))
    assert torch.allclose(matched(fixed, warped, mask), metric(fixed, warped, mask), rtol=1e-4)
    # a baseline's ratio is 1; LCC's compares sum (1 - cc) and is 1 at the Dirac initialisation
    assert torch.allclose(energy_ratio(build_metric("ssd"), fixed, moving, disp, mask), torch.ones(2))
    lcc = build_metric("cnn_lcc", init_noise=0.0)
    assert torch.allclose(energy_ratio(lcc, fixed, moving, disp, mask), torch.ones(2), rtol=1e-4)


def test_matched_precision_refuses_nonsense():
    with pytest.raises(ValueError):
        matched_precision(1.0, 0.0)
    with pytest.raises(ValueError):
        matched_precision(-1.0, 2.0)


def test_matched_to_reads_a_learnt_run(tmp_path):
    from learnsim.cli.test import matched_precision_of

    (tmp_path / "per_pair.csv").write_text("pair,data_weight,energy_ratio\na,100,20\nb,100,30\n")
    assert matched_precision_of(tmp_path) == (100.0, 25.0)
    with pytest.raises(ValueError, match="does not exist"):
        matched_precision_of(tmp_path / "nowhere")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "per_pair.csv").write_text("pair,dsc_mean\na,0.5\n")
    with pytest.raises(ValueError, match="energy_ratio|data_weight"):
        matched_precision_of(tmp_path / "old")


# ------------------------------------------------------------------------------------------- ratio callback
def test_ratio_checkpoint_fires_once_per_threshold(tmp_path):
    saved: list[Path] = []
    trainer = SimpleNamespace(callback_metrics={}, global_step=0, default_root_dir=str(tmp_path),
                              save_checkpoint=lambda p: saved.append(Path(p)))
    cb = EnergyRatioCheckpoint([10, 100, 1000])
    for step, ratio in enumerate([1.0, 5.0, 12.0, 11.0, 150.0, 90.0, 2000.0, 3000.0]):
        trainer.global_step = step
        trainer.callback_metrics = {"metric/energy_ratio_step": torch.tensor(ratio)}
        cb.on_train_batch_end(trainer, None, None, None, step)
    assert [p.name for p in saved] == ["rho10.ckpt", "rho100.ckpt", "rho1000.ckpt"]
    assert [cb.fired[t]["step"] for t in (10.0, 100.0, 1000.0)] == [2, 4, 6]
    again = EnergyRatioCheckpoint([10, 100, 1000])
    again.load_state_dict(cb.state_dict())
    trainer.callback_metrics = {"metric/energy_ratio_step": torch.tensor(5000.0)}
    again.on_train_batch_end(trainer, None, None, None, 9)
    assert len(saved) == 3  # a resumed run does not fire again
    with pytest.raises(ValueError, match="thresholds"):
        EnergyRatioCheckpoint([0])


# ------------------------------------------------------------------------------------------- training
def test_population_update_is_the_closed_form_and_round_trips():
    pop = PopulationLikelihood(LikelihoodLearning(PrecisionPrior(1.0, 1e-3), decimation=1.0))
    pop.add(["a", "b"], [10.0, 30.0], [1000.0, 1000.0], [1.0, 0.5])
    got = pop.update()
    a, b = 1e-3 + (1000 + 500) / 2, 1e-3 + (10 + 15)
    assert got["precision"] == pytest.approx(a / b) and got["decimation"] == pytest.approx(0.75)
    assert got["data_weight"] == pytest.approx(0.75 * a / b)
    pop.add(["a"], [5.0], [1000.0], [1.0])  # a pair's newer statistics replace its older ones
    assert pop.update()["precision"] == pytest.approx((1e-3 + 750) / (1e-3 + 20))
    other = PopulationLikelihood(pop.learning)
    other.load_state_dict(pop.state_dict())
    assert other.update() == pop.update()


def _likelihood_module(metric_kind: str, noise: str) -> LearnSimModule:
    from functools import partial

    from test_module import DIMS

    from learnsim.energies import RegLossL2
    from learnsim.sobolev import SobolevSmoother
    from learnsim.transformation import SVF

    torch.manual_seed(0)
    metric = build_metric(metric_kind, no_features=(2, 4))
    reg = VariationalRegistration(metric, SVF(4), RegLossL2(1.8), SobolevSmoother(True, 1, 0.5), no_iters=3,
                                  optimizer=partial(torch.optim.Adam))
    cfg = {"learn": True, "noise": noise, "decimation": 1.0, "prior_strength": 1e-3}
    return LearnSimModule(metric, reg, dims=DIMS, log_period=2, likelihood=cfg,
                          optimizer_q_phi=partial(torch.optim.Adam, lr=1e-3))


@pytest.mark.parametrize(("kind", "noise"), [("cnn_ssd", "gaussian"), ("ssd_t", "student_t")])
def test_training_learns_the_precision_and_the_checkpoint_carries_it(tmp_path, kind, noise):
    module = _likelihood_module(kind, noise)
    trainer: pl.Trainer = make_trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=PhantomDataModule(n=4, batch_size=2))
    learnt = module.metric.energy.weight
    assert learnt != 1.0 and math.isfinite(learnt) and len(module.population.pairs) == 4
    if noise == "student_t":
        assert math.isfinite(module.metric.energy.nu) or module.metric.energy.nu >= 1e29
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = SimilarityMetric.from_checkpoint(path)
    assert again.energy.weight == pytest.approx(learnt)
    state = torch.load(path, weights_only=True)
    assert len(state["likelihood_population"]["pairs"]) == 4


def test_student_t_learning_needs_a_student_t_metric():
    with pytest.raises(ValueError, match="Student-t"):
        _likelihood_module("cnn_ssd", "student_t")


def test_voxelmorph_trains_on_a_student_t_metric_and_keeps_it_in_its_checkpoint(tmp_path):
    """The learnt noise model is usable by VoxelMorph (metric=ssd_t with a vxm_* experiment)."""
    from test_voxelmorph import SHAPE, SMALL, _loader, _pair_data, _trainer

    from learnsim.energies import RegLossL2
    from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

    torch.manual_seed(0)
    metric = build_metric("ssd_t", weight=50.0, nu=4.0, precision=80.0)
    module = VoxelMorphModule(VoxelMorphNet(**SMALL), metric=metric, reg_loss=RegLossL2(0.1), dims=SHAPE, lr=1e-3)
    batch = _pair_data()
    with torch.no_grad():
        before = module._step(batch)[0].item()
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(module, train_dataloaders=_loader(batch))
    with torch.no_grad():
        after = module._step(batch)[0].item()
    assert math.isfinite(after) and after < before
    trainer.save_checkpoint(tmp_path / "vxm.ckpt")
    loaded = VoxelMorphModule.load_from_checkpoint(tmp_path / "vxm.ckpt", map_location="cpu")
    e = loaded.metric.energy
    assert isinstance(e, StudentT) and (e.weight, e.nu, e.precision) == (50.0, 4.0, 80.0)


@pytest.mark.parametrize(("experiment", "kind", "noise"), [("demo_vb", "ssd", "gaussian"), ("demo_t", "ssd_t", "student_t")])
def test_likelihood_demo_experiments_compose(experiment, kind, noise):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from learnsim.cli.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={experiment}", "data.dims=[16,16,16]"])
    module = instantiate(cfg.model)
    assert module.metric.spec["kind"] == kind and module.metric.energy.weight == 1.0
    assert module.population is not None and module.population.noise == noise
    assert module.registration.likelihood is None  # training learns the population's precision, not each fit's
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        test_cfg = compose(config_name="test", overrides=["+experiment=demo", "metric=ssd", "likelihood=auto"])
    reg = instantiate(test_cfg.registration)(metric=instantiate(test_cfg.metric))
    assert isinstance(reg.likelihood, LikelihoodLearning) and reg.likelihood.decimation == 1.0


def test_noise_figure_draws_the_fits_and_the_weights(tmp_path):
    from learnsim.evaluation.noise_figure import noise_figure

    rng = np.random.default_rng(0)
    hist = ResidualHistogram().add(torch.from_numpy((rng.standard_t(5.0, 50_000) / 10.0) ** 2))
    w, nu = fit_student_t(hist)
    out = noise_figure(hist.counts.numpy(), hist.centres.numpy(), w, nu, rng.random((12, 10)),
                       0.1 * rng.standard_normal((12, 10)), tmp_path / "noise.png")
    assert out.is_file() and out.stat().st_size > 10_000


def test_population_precision_is_the_same_on_one_process_and_two(tmp_path):
    """DDP: each rank's pairs are gathered before the update, so 2 processes x 1 pair per step learn the precision
    1 process x 2 pairs per step learns."""
    from learnsim.distributed import ManualSyncDDPStrategy

    pl.seed_everything(0)
    single = _likelihood_module("ssd", "gaussian")
    make_trainer(tmp_path / "one", max_epochs=1).fit(single, datamodule=PhantomDataModule(n=4, batch_size=2))
    pl.seed_everything(0)
    multi = _likelihood_module("ssd", "gaussian")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path / "two", max_epochs=1, devices=2, enable_checkpointing=True, callbacks=[ckpt],
                           strategy=ManualSyncDDPStrategy(start_method="spawn", process_group_backend="gloo"))
    trainer.fit(multi, datamodule=PhantomDataModule(n=4, batch_size=1))
    w1 = single.metric.energy.weight
    # spawn copies back weights and buffers, not plain attributes: the checkpoint rank 0 wrote carries the precision
    w2 = SimilarityMetric.from_checkpoint(tmp_path / "ckpt" / "last.ckpt").energy.weight
    assert w1 != 1.0 and w2 == pytest.approx(w1, rel=1e-4)


def test_training_energy_ratio_of_lcc_without_a_mask_counts_every_voxel():
    """The ratio logged in training reads LCC's energies as sum(1 - cc) over every voxel when there is no mask
    (a voxel count of 0 made it 0)."""
    from learnsim.module import _energy_ratio

    torch.manual_seed(0)
    lcc = build_metric("cnn_lcc", init_noise=0.0)
    fixed, warped = torch.rand(1, 1, 8, 9, 10), torch.rand(2, 1, 8, 9, 10)
    e_metric, e_base = lcc(fixed, warped), lcc.energy(fixed, warped)
    assert float(_energy_ratio(lcc, e_metric, e_base, None, warped[0, 0].numel())) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("key", ["metric.energy.nu", "metric.energy.precision", "metric.energy.weight",
                                 "likelihood.decimation", "likelihood.prior_mean", "likelihood.prior_strength",
                                 "likelihood.update_every", "likelihood.samples"])
def test_fuzz_the_likelihood_keys(cfg_test, tmp_path, key):
    """0, -1, nan, inf, 1e30 and a huge int on every new key: one line naming the key, or a finite result."""
    from omegaconf import OmegaConf
    from test_reliability_numeric import FUZZ, _outcome

    from learnsim.cli.test import evaluate

    for i, value in enumerate(FUZZ):
        cfg = cfg_test.copy()
        OmegaConf.set_struct(cfg, False)
        if key in ("metric.energy.nu", "metric.energy.precision"):  # metric=ssd_t
            cfg.metric.energy = {"_target_": "learnsim.energies.StudentT", "weight": 100.0, "nu": 5.0,
                                 "precision": None}
        OmegaConf.update(cfg, "likelihood.per_pair", key.startswith("likelihood."))
        OmegaConf.update(cfg, key, value)
        result: dict = {}
        if _outcome(lambda cfg=cfg, i=i, r=result: r.update(evaluate(cfg, tmp_path / str(i))), key) == "ran":
            assert result["n_pairs"] + result.get("n_failed", 0) == 1, (key, value)
            if result["n_pairs"]:
                assert math.isfinite(result["overall"]["dsc"]["mean"]), (key, value)
