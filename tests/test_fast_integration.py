"""Fast-mode integration: adaptive squarings and integration on a coarser grid."""

from __future__ import annotations

import pytest
import torch

from learnsim.fast_integration import auto_steps, coarse_shape, integrate_fast, resize_field
from learnsim.spatial import gaussian_smooth, integrate_svf
from learnsim.transformation import SVF, SVFFD


def test_auto_steps_is_the_fewest_with_a_half_voxel_first_step():
    v = torch.zeros(1, 3, 4, 4, 4)
    assert auto_steps(v) == 0
    v[0, 1, 2, 2, 2] = -3.0  # 3 / 2^3 = 0.375 <= 0.5 < 3 / 2^2
    assert auto_steps(v) == 3
    v[0, 0, 0, 0, 0] = 1e6
    assert auto_steps(v) == 12  # capped
    assert auto_steps(v, max_steps=5) == 5


def test_coarse_grid_keeps_every_second_voxel_of_odd_axes():
    assert coarse_shape((17, 16, 9), 2) == (9, 9, 5)


def test_resize_keeps_a_translation_in_world_units():
    # a constant field of 2 voxels on 17 voxels (16 intervals) is 1 voxel on 9 voxels (8 intervals), and back
    v = torch.zeros(1, 3, 17, 13, 9)
    v[:, 0], v[:, 1], v[:, 2] = 2.0, -4.0, 1.0
    c = resize_field(v, (9, 7, 5))
    assert torch.allclose(c[:, 0], torch.full_like(c[:, 0], 1.0))
    assert torch.allclose(c[:, 1], torch.full_like(c[:, 1], -2.0))
    assert torch.allclose(c[:, 2], torch.full_like(c[:, 2], 0.5))
    assert torch.allclose(resize_field(c, (17, 13, 9)), v, atol=1e-6)


def test_fast_integration_is_close_to_the_exact_one():
    g = torch.Generator().manual_seed(0)
    v = gaussian_smooth(torch.randn(2, 3, 33, 29, 31, generator=g), 4.0) * 20
    assert 1.0 < float(v.abs().max()) < 8.0
    exact = integrate_svf(v, 12)
    scale = float(exact.abs().max())
    # (a field with 4-voxel smoothness: half resolution costs a few per cent, like VoxelMorph's int_downsize)
    for steps, down, tol in (("auto", 1, 0.03), (12, 2, 0.1), ("auto", 2, 0.1)):
        u = integrate_fast(v, steps, down)
        err = float((u - exact).abs().max())
        assert err < tol * scale, (steps, down, err, scale)
    # and the gradient flows back to v through the resampling
    vg = v.clone().requires_grad_(True)
    integrate_fast(vg, "auto", 2).square().sum().backward()
    assert torch.isfinite(vg.grad).all() and vg.grad.abs().max() > 0


def test_svf_exact_by_default_and_settings_checked():
    assert SVF().exact and SVF(12, 1).exact
    assert not SVF("auto").exact and not SVF(12, 2).exact and not SVFFD("auto", 2).exact
    for bad in (-1, "twelve", 1.5, True):
        with pytest.raises(ValueError, match="no_steps"):
            SVF(bad)
    with pytest.raises(ValueError, match="int_downsize"):
        SVF(12, 0)


def test_register_fast_mode_options_recover_the_shift_and_parse_from_the_cli():
    """``learnsim.register(no_steps="auto", int_downsize=2)`` builds the fast-mode SVF and still recovers a one-voxel
    shift; the CLI reads ``no_steps=auto`` / ``int_downsize=2`` and refuses a bad factor, naming the key."""
    from learnsim import api
    from learnsim.cli.register import _parse_overrides

    shape = (20, 24, 28)
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")

    def blob(c):
        return torch.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * 3.0**2))

    out = api.register(blob((10, 12, 14)), blob((11.0, 12, 13)), "ssd", no_iters=150, lr=0.05, no_steps="auto",
                       int_downsize=2, no_samples=2, sigma_init=0.05, w_reg=0.5, histmatch=False, device="cpu")
    centre = out.disp[0, :, 8:13, 10:15, 12:17].mean(dim=(1, 2, 3))
    assert torch.allclose(centre, torch.tensor([1.0, 0.0, -1.0]), atol=0.3), centre
    assert _parse_overrides(["no_steps=auto", "int_downsize=2"]) == {"no_steps": "auto", "int_downsize": 2}
    with pytest.raises(ValueError, match=r"int_downsize must be an integer in \[1, 8\]"):
        api.register(blob((10, 12, 14)), blob((10, 12, 14)), "ssd", no_iters=1, int_downsize=0, device="cpu")
