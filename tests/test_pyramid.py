"""Coarse-to-fine q_v: pyramid, transfer of q_v between levels, ``levels = 1`` equal to the single-level fit."""

from __future__ import annotations

import math

import pytest
import torch

from learnsim.distributions import LowRankParams
from learnsim.energies import RegLossL2
from learnsim.metric import build_metric
from learnsim.pyramid import Pyramid, coarse_shape, downsample, level_shapes, upsample_q_v
from learnsim.registration import LevelSchedule, VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth, integrate_svf
from learnsim.transformation import SVF

torch.set_num_threads(1)


def test_level_shapes_coarsest_first():
    assert level_shapes((64, 48, 30), 3) == [(16, 12, 8), (32, 24, 15), (64, 48, 30)]
    assert level_shapes((9, 9, 9), 1) == [(9, 9, 9)]
    assert coarse_shape((15, 16, 1)) == (8, 8, 1)
    with pytest.raises(ValueError, match="levels"):
        level_shapes((8, 8, 8), 0)


def test_downsample_is_anti_aliased_and_keeps_range():
    d = torch.arange(16).view(16, 1, 1) + torch.arange(16).view(1, 16, 1) + torch.arange(16).view(1, 1, 16)
    checker = (d % 2).float()[None, None]  # the Nyquist frequency: plain subsampling keeps it at full contrast
    assert checker[..., ::2, ::2, ::2].std() == 0 and checker[..., ::2, ::2, 1::2].mean() == 1  # aliasing, for contrast
    small = downsample(checker)
    assert small.shape == (1, 1, 8, 8, 8)
    assert (small - 0.5).abs().max() < 0.05  # the checkerboard averages out instead of aliasing to a flat 0 or 1
    const = torch.full((2, 1, 10, 12, 14), 0.3)
    assert torch.allclose(downsample(const), torch.full((2, 1, 5, 6, 7), 0.3), atol=1e-6)
    mask = (torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    m = downsample(mask)
    assert m.min() >= 0 and m.max() <= 1
    pyr = Pyramid(const[:1], const, None, 3)
    assert [tuple(x.shape[2:]) for x in pyr.moving] == [(3, 3, 4), (5, 6, 7), (10, 12, 14)]
    assert pyr.mask == [None, None, None] and pyr.moving[-1] is const


@pytest.mark.parametrize("fine", [(16, 20, 24), (16, 15, 20)])
def test_constant_velocity_is_the_same_translation_in_mm(fine):
    """A constant coarse velocity ``c`` integrates to the translation ``c`` coarse voxels; the transferred velocity
    integrates to ``c * s`` fine voxels: the same translation in mm (coarse spacing ``s`` fine voxels, ``s = n / m``,
    here 2 and, for the odd axis 15 -> 8, 1.875)."""
    coarse = coarse_shape(fine)
    s = torch.tensor([f / c for f, c in zip(fine, coarse, strict=False)]).view(1, 3, 1, 1, 1)
    c = torch.tensor([0.7, -0.4, 1.1]).view(1, 3, 1, 1, 1)
    loc = c.expand(1, 3, *coarse).clone()
    q = LowRankParams(loc, torch.zeros_like(loc), torch.zeros(1, 1, 3, *coarse))
    up = upsample_q_v(q, fine)
    assert up.loc.shape == (1, 3, *fine) and up.u.shape == (1, 1, 3, *fine)
    assert torch.allclose(up.loc, (c * s).expand_as(up.loc), atol=1e-6)
    disp_c_mm = integrate_svf(loc, 6) * s  # coarse voxels -> mm with a fine spacing of 1 mm
    disp_f_mm = integrate_svf(up.loc, 6)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert torch.allclose(disp_f_mm[inner], (c * s).expand_as(disp_f_mm)[inner], atol=1e-4)
    assert torch.allclose(disp_c_mm[..., 2:-2, 2:-2, 2:-2].mean((2, 3, 4)), disp_f_mm[inner].mean((2, 3, 4)), atol=1e-4)


def _smooth_field(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(math.prod(shape[:-4]), *shape[-4:], generator=g)
    return gaussian_smooth(x, 1.0).reshape(shape) * scale


def test_transferred_entropy_per_voxel_in_mm_is_preserved():
    """What is tested: for the diagonal part (u = 0) and a spatially varying sigma on an even grid,

    * entropy per voxel in mm, ``(H + 3 N log h) / N`` with ``H = 0.5 log det Sigma`` in voxel units
      (``LowRankParams.entropy``), is equal at both levels (h: 2 coarse, 1 fine);
    * hence the entropy per unit volume, ``(H + 3 N log h) / V``, is exactly ``8x`` on the fine grid
      (8 independent voxels per coarse voxel, each with the coarse marginal std in mm);
    * interpolating ``sigma`` instead of ``log sigma^2`` would break the first equality (Jensen): checked too.
    """
    coarse, fine = (6, 8, 10), (12, 16, 20)
    log_var = _smooth_field((2, 3, *coarse), 1, scale=3.0)
    q = LowRankParams(torch.zeros_like(log_var), log_var, torch.zeros(2, 1, 3, *coarse))
    up = upsample_q_v(q, fine)
    n_c, n_f = math.prod(coarse), math.prod(fine)
    h_c, h_f = 2.0, 1.0
    per_voxel_c = (q.entropy() + 3 * n_c * math.log(h_c)) / n_c
    per_voxel_f = (up.entropy() + 3 * n_f * math.log(h_f)) / n_f
    assert torch.allclose(per_voxel_f, per_voxel_c, atol=1e-5, rtol=0)
    volume = n_f * h_f**3
    assert torch.allclose((up.entropy() + 3 * n_f * math.log(h_f)) / volume,
                          8 * (q.entropy() + 3 * n_c * math.log(h_c)) / volume, rtol=1e-5)
    # the naive alternative: interpolate sigma itself
    sigma = torch.nn.functional.interpolate(torch.exp(0.5 * log_var), size=fine, mode="trilinear") * 2
    naive = LowRankParams(up.loc, 2 * torch.log(sigma), up.u)
    assert ((naive.entropy() / n_f) - per_voxel_f).abs().min() > 1e-3


def test_low_rank_mode_is_pushed_forward_exactly():
    """``u`` is one field per mode scaled by a scalar ``xi``: the fine mode is the coarse one in fine voxels."""
    coarse, fine = (4, 6, 8), (8, 12, 16)
    u = _smooth_field((1, 2, 3, *coarse), 2)
    q = LowRankParams(torch.zeros(1, 3, *coarse), torch.zeros(1, 3, *coarse), u)
    up = upsample_q_v(q, fine)
    ref = torch.nn.functional.interpolate(u[0], size=fine, mode="trilinear", align_corners=False)[None] * 2
    assert torch.allclose(up.u, ref, atol=1e-6)
    assert torch.allclose(up.log_var, torch.full_like(up.log_var, 2 * math.log(2.0)), atol=1e-6)


def _problem(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, n)
    zz, yy, xx = torch.meshgrid(x, x, x, indexing="ij")
    fixed = torch.exp(-((zz**2 + yy**2 + xx**2) / 0.25))[None, None]
    moving = torch.exp(-(((zz - 0.2) ** 2 + (yy + 0.15) ** 2 + xx**2) / 0.3))[None, None]
    moving = (moving + 0.02 * torch.rand(moving.shape, generator=g)).clamp(0, 1)
    mask = torch.ones_like(fixed)
    return fixed, moving, mask


def _registration(**kw) -> VariationalRegistration:
    metric = build_metric("ssd", weight=50.0)
    return VariationalRegistration(metric, SVF(4), RegLossL2(1.8), SobolevSmoother(True, 3, 0.5), no_iters=6,
                                   lr=0.05, uniform_noise=0.0, **kw)


def test_levels_1_equals_todays_single_level_fit():
    """``fit_levels`` with one level == ``fit`` == the loop ``fit`` always ran (fresh fused Adam on reg.loss),
    bit for bit, with the same seed."""
    fixed, moving, mask = _problem()
    reg = _registration()
    assert reg.schedule == LevelSchedule((6,), (0.05,))
    a = reg.fit(fixed, moving, mask, generator=torch.Generator().manual_seed(3))
    b = reg.fit_levels(fixed, moving, mask, generator=torch.Generator().manual_seed(3))
    # today's loop, written out
    gen = torch.Generator().manual_seed(3)
    leaves = [t.clone().requires_grad_(True) for t in reg.init_params(1, fixed.shape[2:]).tensors()]
    opt = torch.optim.Adam(leaves, lr=0.05, fused=True)
    feat = reg.metric.features(fixed).detach()
    for _ in range(6):
        loss = reg.loss(LowRankParams(*leaves), feat, moving, mask, False, gen)
        grads = torch.autograd.grad(loss.sum(), leaves)
        for leaf, gr in zip(leaves, grads, strict=False):
            leaf.grad = gr.contiguous()
        opt.step()
    for x, y, z in zip(a.params.tensors(), b.params.tensors(), leaves, strict=False):
        assert torch.equal(x, y)
        assert torch.equal(x, z.detach())
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.params.loc, reg.init_params(1, fixed.shape[2:]).loc)  # it did move


def test_fit_levels_runs_coarse_to_fine_and_registers():
    fixed, moving, mask = _problem(n=16)
    reg = _registration(levels=3, level_iters=[10, 6, 4], level_lr=[0.1, 0.05, 0.05])
    seen, its = [], []
    fit = reg.fit_levels(fixed, moving, mask, generator=torch.Generator().manual_seed(0), log_every=1,
                         progress=lambda it, loss: its.append(it), on_level=lambda *a: seen.append(a))
    assert seen == [(0, 3, (4, 4, 4), 10), (1, 3, (8, 8, 8), 6), (2, 3, (16, 16, 16), 4)]
    assert its == list(range(20)) and [it for it, _ in fit.history] == its
    assert fit.params.loc.shape == (1, 3, 16, 16, 16)
    ssd = lambda d: 0.5 * ((fixed - __import__("learnsim.spatial", fromlist=["warp"]).warp(moving, d)) ** 2).sum()  # noqa: E731
    assert ssd(reg.mean_displacement(fit.params, (16, 16, 16))) < 0.7 * ssd(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="level_iters"):
        _registration(levels=2, level_iters=[5])
    with pytest.raises(ValueError, match="levels"):
        _registration(levels=0)


def test_q_v_config_levels_default_and_experiments_unchanged():
    from hydra import compose, initialize_config_dir

    from learnsim.cli.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for exp, iters in (("ssd", 1024), ("lcc", 1344)):
            cfg = compose("train", overrides=[f"+experiment={exp}"])
            assert cfg.q_v.levels == 1 and cfg.q_v.no_iters == iters
            assert cfg.q_v.level_iters is None and cfg.q_v.level_lr is None


def test_register_defaults_and_cli_overrides_compose():
    from learnsim.api import REGISTER_DEFAULTS, register_schedule
    from learnsim.cli.register import _parse_overrides

    for energy in ("ssd", "lcc"):
        d = REGISTER_DEFAULTS[energy]
        assert register_schedule(energy) == LevelSchedule(tuple(d["level_iters"]), tuple(d["level_lr"]))
    assert register_schedule("ssd", no_iters=1024) == LevelSchedule((1024,), (0.01,))  # the paper's schedule
    assert register_schedule("lcc", levels=1) == LevelSchedule((1344,), (0.02,))
    kw = _parse_overrides(["levels=2", "level_iters=[20,10]", "level_lr=0.1,0.05"])
    assert kw == {"levels": 2, "level_iters": [20, 10], "level_lr": [0.1, 0.05]}
    assert register_schedule("ssd", **kw) == LevelSchedule((20, 10), (0.1, 0.05))


def test_register_cli_summary_line(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from learnsim.cli.register import main

    x = np.stack(np.meshgrid(*[np.arange(16, dtype=np.float32)] * 3, indexing="ij"))
    blob = lambda c: np.exp(-(((x - np.reshape(c, (3, 1, 1, 1))) / 3.0) ** 2).sum(0) / 2).astype(np.float32)  # noqa: E731
    paths = {}
    for name, arr in (("f", blob((8, 8, 8))), ("m", blob((9, 7, 8))), ("fs", (blob((8, 8, 8)) > 0.5) * 17),
                      ("ms", (blob((9, 7, 8)) > 0.5) * 17)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32 if name in "fm" else np.int16), np.eye(4)), paths[name])
    main([str(paths["f"]), str(paths["m"]), "--out", str(tmp_path / "o"), "--seg", str(paths["ms"]), "--fixed-seg",
          str(paths["fs"]), "--no-figures", "level_iters=6,4,3", "no_steps=4", "no_samples=2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("learnsim-register: DSC 0.") and "folding voxels" in line and line.endswith(" s")
    info = __import__("json").loads((tmp_path / "o" / "registration.json").read_text())
    assert info["q_v_levels"] == [6, 4, 3] and info["dsc_after"] >= info["dsc_before"] - 0.05
