"""The bounded metric objective (``metric.normalise``) and the training budget of LearnSimModule (seconds, tiny grids)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from conftest import PhantomPairs
from torch.utils.data import DataLoader

from learnsim.energies import RegLossL2
from learnsim.metric import CNNSSD, build_metric, masked_rms
from learnsim.module import LearnSimModule
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth, integrate_svf, warp
from learnsim.transformation import SVF

DIMS = (16, 16, 16)


def _randomise_(metric) -> None:
    """Random weights and biases everywhere (no Dirac structure left)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in metric.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(dims=DIMS):
    ds = PhantomPairs(2, dims, disp_scale=3.0)
    mask = torch.ones_like(ds.atlas)
    mask[..., :3] = 0
    return ds.atlas, torch.stack(ds.moving), mask


@pytest.mark.parametrize("kind", ["ssd", "lcc"])
def test_normalised_dirac_init_equals_baseline_energy_and_gradient(kind):
    fixed, moving, mask = _pair()
    learnt, base = build_metric(f"cnn_{kind}", normalise=True), build_metric(kind)
    c = learnt.calibrate_(fixed, mask)
    assert abs(float(c) - 1.0) < 1e-5
    v = (torch.randn(2, 3, *DIMS, generator=torch.Generator().manual_seed(0)) * 0.5).requires_grad_(True)
    out = []
    for metric in (learnt, base):
        e = metric(fixed, warp(moving, integrate_svf(v, 6)), mask)
        out.append((e.detach(), torch.autograd.grad(e.sum(), v)[0]))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    assert (out[0][1] - out[1][1]).norm() / out[1][1].norm() < 1e-4


@pytest.mark.parametrize("kind", ["cnn_ssd", "cnn_lcc"])
def test_normalised_energy_is_invariant_to_the_feature_scale_on_random_weights(kind):
    fixed, moving, mask = _pair()
    metric = build_metric(kind, normalise=True, no_features=(2, 4))
    _randomise_(metric)
    metric.calibrate_(fixed, mask)
    before = metric(fixed, moving, mask)
    raw_before = metric.raw_features(fixed)
    for k in (0.01, 7.3):
        with torch.no_grad():  # a -> k a: the aggregation is linear and has no bias
            metric.encoder.aggregation.weight.mul_(k)
        metric.calibrate_(fixed, mask)
        assert torch.allclose(metric(fixed, moving, mask), before, rtol=1e-4)
        with torch.no_grad():
            metric.encoder.aggregation.weight.div_(k)
    # the normalised atlas features have the atlas' RMS inside the mask, whatever the weights
    metric.calibrate_(fixed, mask)
    assert torch.allclose(masked_rms(metric.features(fixed), mask), masked_rms(fixed, mask), rtol=1e-5)
    # the original (unnormalised) SSD features: the energy scales as k^2
    if kind == "cnn_ssd":
        plain = build_metric(kind, no_features=(2, 4))
        _randomise_(plain)
        assert torch.allclose(plain.raw_features(fixed), raw_before)
        e0 = plain(fixed, moving, mask)
        with torch.no_grad():
            plain.encoder.aggregation.weight.mul_(3.0)
        assert torch.allclose(plain(fixed, moving, mask), 9.0 * e0, rtol=1e-4)


def _module(normalise: bool, lr: float = 1e-2, **kw) -> LearnSimModule:
    torch.manual_seed(0)
    metric = CNNSSD(no_features=(2, 4), normalise=normalise)
    reg = VariationalRegistration(metric, SVF(4), RegLossL2(1.8), SobolevSmoother(True, 1, 0.5), **kw)
    return LearnSimModule(metric, reg, dims=DIMS, optimizer_q_phi=partial(torch.optim.Adam, lr=lr), log_period=1)


def _broadband_pair():
    """A 16^3 atlas with power at all frequencies (as brain MRI has; the bound below depends on it) and two
    moving images, its slightly deformed copies."""
    g = torch.Generator().manual_seed(0)
    atlas = gaussian_smooth(torch.rand(1, 1, *DIMS, generator=g), 0.5)
    atlas = (atlas - atlas.min()) / (atlas.max() - atlas.min())
    moving = [warp(atlas, integrate_svf(gaussian_smooth(torch.randn(1, 3, *DIMS, generator=g), 2.0), 6)) for _ in "ab"]
    return atlas, torch.cat(moving)


@pytest.mark.parametrize("normalise", [False, True])
def test_q_phi_steps_grow_the_scale_only_without_normalisation(normalise):
    """40 q_phi steps at a large learning rate (1e-2). The metric's scale, the learnt energy of the registered
    pairs over SSD's, grows without bound under the original objective (~k^2: > 1000x and still rising); with
    the normalised features the atlas' feature RMS is fixed and the ratio stays below the spectral bound of the
    module docstring (noise-to-atlas power ratio; measured <= ~55 here)."""
    fixed, warped = _broadband_pair()
    mask = torch.ones_like(fixed)
    model = _module(normalise)
    model.set_atlas(fixed)
    opt_f, opt_phi = model.configure_optimizers()
    g = torch.Generator().manual_seed(1)
    ratios, raw_rms = [], []
    for _ in range(40):
        out = model._contrastive_step(opt_f, opt_phi, fixed, mask, warped, *model.q_f.sample_antithetic(g))
        ratios.append(float(out["energy_ratio"]))
        raw_rms.append(float(out["raw_feature_rms"]))
    metric = model.metric
    if normalise:
        assert max(ratios) < 100, ratios
        assert torch.allclose(masked_rms(metric.features(fixed), mask), masked_rms(fixed, mask), rtol=1e-4)
        assert abs(float(metric.feature_scale) - float(metric.atlas_scale(fixed, mask))) < 1e-6
    else:
        assert ratios[-1] > 1000 and ratios[-1] > ratios[30] > ratios[20] > ratios[10], ratios
        assert raw_rms[-1] > 5 * raw_rms[0], raw_rms


class _Pairs(pl.LightningDataModule):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.ds = PhantomPairs(n, DIMS, disp_scale=2.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=len(self.ds), shuffle=False)


def test_first_fit_is_coarse_to_fine_and_later_epochs_use_the_warm_iterations(tmp_path):
    model = _module(True, no_iters=4, levels=2, level_iters=[3, 2], level_lr=[0.05, 0.05])
    model.no_iters_warm = 1
    reg = model.registration
    calls: list[tuple[str, int]] = []  # (which fit, q_v steps it ran)
    fit, fit_levels, step = reg.fit, reg.fit_levels, reg._step
    steps = [0]

    def counting_step(*a, **k):
        steps[0] += 1
        return step(*a, **k)

    def spy(name, fn):
        def wrapped(*a, **k):
            before = steps[0]
            out = fn(*a, **k)
            calls.append((name, steps[0] - before))
            return out
        return wrapped

    reg._step = counting_step
    reg.fit_levels = spy("fit_levels", fit_levels)
    reg.fit = spy("fit", fit)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False)
    trainer.fit(model, datamodule=_Pairs())
    # epoch 0: the pyramid (fit_levels calls fit once per level: 3 + 2 steps); epochs 1, 2: one warm level, 1 step
    top = [c for c in calls if c[0] == "fit_levels"]
    assert top == [("fit_levels", 5)]
    assert calls == [("fit", 3), ("fit", 2), ("fit_levels", 5), ("fit", 1), ("fit", 1)]


def test_paper_experiments_keep_the_original_objective_and_the_demo_the_bounded_one():
    from conftest import _compose

    for exp in ("ssd", "lcc"):
        cfg = _compose("train", [f"+experiment={exp}"])
        assert cfg.metric.normalise is False and cfg.q_f.objective == "original"
        assert cfg.q_v.no_iters_warm is None and cfg.q_v.levels == 1 and cfg.model.no_iters_warm is None
    for exp, weight in (("demo", 100.0), ("demo_lcc", 10.0)):
        cfg = _compose("train", [f"+experiment={exp}"])
        assert cfg.metric.normalise is True and cfg.metric.energy.weight == weight
        assert cfg.q_v.levels == 3 and cfg.model.no_iters_warm == cfg.q_v.no_iters_warm == 16
        assert cfg.callbacks.model_checkpoint.monitor == "val/dsc" and list(cfg.data.dims) == [48, 48, 48]
        test = _compose("test", [f"+experiment={exp}", "metric=ssd"])
        assert test.q_v.levels == 3 and test.data.intensity == "histmatch"


def test_linear_log_det_matches_the_dense_matrix_and_is_zero_at_the_dirac_init():
    import torch.nn.functional as F

    assert abs(float(build_metric("cnn_ssd", normalise=True).linear_log_det((8, 8, 8)))) < 1e-3
    metric = build_metric("cnn_ssd", no_features=(2, 3))
    _randomise_(metric)
    shape = (4, 5, 6)

    def linear_part(x):  # circular convolutions, LeakyReLU as the identity, no biases
        for conv in metric.encoder.convs:
            x = F.conv3d(F.pad(x, (1,) * 6, mode="circular"), conv.weight)
        return F.conv3d(x, metric.encoder.aggregation.weight)

    n = 4 * 5 * 6
    with torch.no_grad():
        dense = torch.stack([linear_part(torch.eye(n)[i].view(1, 1, *shape)).flatten() for i in range(n)])
        assert abs(float(metric.linear_log_det(shape)) - float(torch.linalg.slogdet(dense.double())[1])) < 1e-3
        # the normalised metric adds n log c
        c = torch.tensor(3.0)
        assert abs(float(metric.linear_log_det(shape, c) - metric.linear_log_det(shape)) - n * float(torch.log(c))) < 1e-2
