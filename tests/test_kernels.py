"""The numba CPU kernels equal the PyTorch path (forward and both gradients) and pass gradcheck in float64."""

from __future__ import annotations

import logging

import pytest
import torch

from learnsim import spatial
from learnsim.energies import l2_gradient_energy, lcc
from learnsim.kernels import backend, use_backend
from learnsim.sobolev import SobolevSmoother

pytest.importorskip("numba")

from learnsim.kernels import ops  # noqa: E402

SHAPES = [(9, 11, 13), (16, 12, 10)]


def smooth_field(b: int, shape, scale: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (spatial.gaussian_smooth(torch.randn(b, 3, *shape, generator=g, dtype=torch.float64), 1.5) * scale).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def both_paths(fn, *inputs):
    """``fn`` on the numba and the torch path: outputs and gradients of ``sum(out * w)`` w.r.t. each input."""
    results = []
    for name in ("numba", "torch"):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        with use_backend(name):
            out = fn(*leaves)
            w = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
            grads = torch.autograd.grad((out * w).sum(), leaves)
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("scale", [2.0, 6.0])
def test_integration_equals_torch_path(shape, batch, scale):
    # scale 6: displacements of several voxels, many samples leave the grid (border clamping)
    v = smooth_field(batch, shape, scale, seed=batch, dtype=torch.float64)
    (un, (gn,)), (ut, (gt,)) = both_paths(lambda x: spatial.integrate_svf(x, 8), v)
    # float64: the same maths, so the same numbers to rounding
    assert rel_err(un, ut) < 1e-10 and rel_err(gn, gt) < 1e-10
    # float32: the forward within 1e-5 (max relative). The gradient of 8 squarings is only as good as float32 makes
    # it on either path (a coordinate rounded across a voxel face flips a trilinear slope at a few voxels): both
    # paths are within 5e-5 of the float64 truth in relative L2 norm
    (un32, (gn32,)), (ut32, (gt32,)) = both_paths(lambda x: spatial.integrate_svf(x, 8), v.float())
    assert rel_err(un32, ut32) < 1e-5
    for g32 in (gn32, gt32):
        assert float((g32.double() - gn).norm() / gn.norm()) < 5e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("image_batch", [1, 2])
def test_warp_equals_torch_path_both_gradients(shape, image_batch):
    disp = smooth_field(2, shape, 5.0, seed=7)
    image = torch.rand(image_batch, 2, *shape, generator=torch.Generator().manual_seed(3))
    (wn, (gin, gdn)), (wt, (git, gdt)) = both_paths(spatial.warp, image, disp)
    assert wn.shape == (2, 2, *shape)
    assert rel_err(wn, wt) < 1e-5
    assert gin.shape == image.shape
    assert rel_err(gdn, gdt) < 1e-5  # w.r.t. the displacement
    assert rel_err(gin, git) < 1e-5  # w.r.t. the image


def test_integer_coordinates_have_forward_difference_slopes():
    # zero displacement samples exactly at voxel centres, where trilinear interpolation has a kink: the kernel takes
    # the forward difference (PyTorch's normalised coordinates round either way there, so it is no reference);
    # on the border the gradient is 0 (grid_sample's convention: the border counts as outside)
    shape = (5, 6, 7)
    disp = torch.zeros(1, 3, *shape, requires_grad=True)
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    with use_backend("numba"):
        out = spatial.warp(image, disp)
        (grad,) = torch.autograd.grad(out.sum(), disp)
    assert torch.equal(out, image)
    expected = torch.zeros_like(image[0, 0])
    expected[:, :, 1:-1] = image[0, 0, :, :, 2:] - image[0, 0, :, :, 1:-1]
    assert torch.allclose(grad[0, 2], expected, atol=1e-6)
    assert grad[0, 0, 0].abs().max() == 0 and grad[0, 0, -1].abs().max() == 0


def test_samples_outside_the_grid_clamp_like_grid_sample():
    # a translation far outside the grid along every axis: everything samples the border
    shape = (6, 7, 8)
    disp = torch.zeros(1, 3, *shape)
    disp[:, 0] = 20.0
    disp[:, 1] = -20.0
    disp[:, 2] = 3.5
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    (wn, (gin, gdn)), (wt, (git, gdt)) = both_paths(spatial.warp, image, disp)
    assert torch.allclose(wn, wt, atol=1e-6)
    # every voxel samples row D-1, column 0 (clamped), at W index x + 3.5 (clamped to W-1)
    x = torch.arange(shape[2], dtype=torch.float32) + 3.5
    x0 = x.floor().long().clamp(max=shape[2] - 1)
    x1 = (x0 + 1).clamp(max=shape[2] - 1)
    f = (x.clamp(max=shape[2] - 1) - x0)
    row = image[0, 0, -1, 0]
    expected = row[x0] * (1 - f) + row[x1] * f
    assert torch.allclose(wn[0, 0], expected.expand(shape), atol=1e-6)
    # clamped coordinates have zero gradient along D and H, as in grid_sample
    assert gdn[:, :2].abs().max() == 0 and gdt[:, :2].abs().max() == 0
    assert torch.allclose(gdn, gdt, atol=1e-6) and torch.allclose(gin, git, atol=1e-6)


def test_sobolev_and_regulariser_equal_torch_path():
    v = smooth_field(2, (10, 9, 12), 2.0, seed=11) + torch.randn(2, 3, 10, 9, 12) * 0.3
    smoother = SobolevSmoother(True, 3, 0.5)
    (sn, _), (st, _) = both_paths(smoother, v)
    assert rel_err(sn, st) < 1e-6
    (en, (gn,)), (et, (gt,)) = both_paths(lambda x: l2_gradient_energy(x, 1.8), v)
    assert en.shape == (2,)
    assert rel_err(en, et) < 1e-5 and rel_err(gn, gt) < 1e-5


@pytest.mark.parametrize("shift", [0.3, 9.0])
def test_adjoint_is_deterministic_and_exact_for_any_reach(shift, monkeypatch):
    monkeypatch.setattr(ops, "SERIAL_BELOW", 0)  # the parallel schedule even on this tiny grid
    # the adjoint's slab schedule depends on how far samples reach along D: small (many slabs per phase) or
    # beyond the grid (one slab); float64 against the PyTorch path, and bit-identical on a second run
    v = smooth_field(3, (20, 7, 6), 1.0, seed=4, dtype=torch.float64)
    v[:, 0] += shift
    (un, (gn,)), (ut, (gt,)) = both_paths(lambda x: spatial.integrate_svf(x, 5), v)
    assert rel_err(gn, gt) < 1e-10
    (_, (gn2,)), _ = both_paths(lambda x: spatial.integrate_svf(x, 5), v)
    assert torch.equal(gn, gn2)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_lcc_equals_torch_path(channels, masked):
    g = torch.Generator().manual_seed(channels)
    shape = (9, 10, 11)
    fixed = torch.rand(1, channels, *shape, generator=g, dtype=torch.float64)
    warped = torch.rand(3, channels, *shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, *shape, generator=g) > 0.3).double() if masked else None
    (en, (gn,)), (et, (gt,)) = both_paths(lambda m: lcc(fixed, m, mask, 2), warped)
    assert rel_err(en, et) < 1e-10 and rel_err(gn, gt) < 1e-10
    (en, (gn,)), (et, (gt,)) = both_paths(lambda m: lcc(fixed.float(), m, mask, 1), warped.float())
    assert rel_err(en, et) < 1e-5 and float((gn - gt).norm() / gt.norm()) < 1e-5


def test_gradcheck_float64_tiny_grid():
    shape = (4, 5, 3)
    v = smooth_field(2, shape, 1.5, seed=5, dtype=torch.float64).requires_grad_(True)
    image = torch.rand(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.integrate_svf(x, 3), (v,), eps=1e-6, atol=1e-5)
    disp = smooth_field(2, shape, 1.2, seed=6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.warp, (image, disp), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: ops.l2_gradient_energy(x, 0.7), (v,), eps=1e-6, atol=1e-5)
    fixed = torch.rand(1, 1, *shape, dtype=torch.float64)
    warped = torch.rand(2, 1, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: ops.lcc(fixed, m, None, 1), (warped,), eps=1e-6, atol=1e-5)


def test_constant_velocity_is_exact_translation_on_numba_path():
    v = torch.zeros(1, 3, 8, 9, 10)
    v[:, 1] = 1.25
    with use_backend("numba"):
        u = spatial.integrate_svf(v, 6)
    # interior voxels move by exactly v (the border clamps the last rows)
    assert torch.allclose(u[:, :, :, :6], v[:, :, :, :6], atol=1e-5)


def test_backend_switch_and_fallback(monkeypatch, caplog):
    x = torch.zeros(1, 3, 4, 4, 4)
    with use_backend("torch"):
        assert not backend.use_numba(x)
    with use_backend("numba"):
        assert backend.use_numba(x)
        assert not backend.use_numba(x.to(torch.float16))
    monkeypatch.setenv("LEARNSIM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="LEARNSIM_KERNELS"):
        backend.get_backend()
    monkeypatch.delenv("LEARNSIM_KERNELS")
    # numba unavailable: auto falls back to torch with one log line; an explicit request fails loudly
    monkeypatch.setitem(backend._state, "numba", None)
    import builtins

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name.startswith("learnsim.kernels.trilinear_numba") or (args and args[2] and "trilinear_numba" in args[2]):
            raise ImportError("no numba here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_numba)
    with caplog.at_level(logging.WARNING, logger="learnsim.kernels.backend"):
        assert not backend.use_numba(x)
        assert not backend.use_numba(x)
    assert sum("numba kernels unavailable" in r.message for r in caplog.records) == 1
    with use_backend("numba"), pytest.raises(RuntimeError, match="pip install numba"):
        backend.use_numba(x)
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(backend._state, "numba", None)
    assert backend.numba_available()


@pytest.mark.parametrize("rank,batch,dtype", [(1, 1, torch.float32), (1, 3, torch.float32), (2, 2, torch.float64)])
def test_antithetic_pair_and_entropy_equal_torch_path(rank, batch, dtype):
    """The fused sample + entropy: same pair, same entropy, same gradients w.r.t. loc, log_var and u (both outputs
    weighted, so the entropy's adjoint is checked too)."""
    from learnsim.distributions import LowRankParams, antithetic_pair

    shape = (batch, 3, 7, 6, 5)
    g = torch.Generator().manual_seed(rank + batch)
    loc = torch.randn(shape, generator=g, dtype=dtype)
    log_var = 0.5 * torch.randn(shape, generator=g, dtype=dtype) - 1.0
    u = 0.2 * torch.randn(batch, rank, *shape[1:], generator=g, dtype=dtype)
    results = []
    for name in ("numba", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (loc, log_var, u)]
        with use_backend(name):
            pair, entropy = antithetic_pair(LowRankParams(*leaves), torch.Generator().manual_seed(7))
        w = torch.linspace(-1, 2, pair.numel(), dtype=dtype).view_as(pair)
        grads = torch.autograd.grad((pair * w).sum() - 3.0 * entropy.sum(), leaves)
        results.append((pair.detach(), entropy.detach(), grads))
    (p_n, h_n, g_n), (p_t, h_t, g_t) = results
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert p_n.shape == (2 * batch, *shape[1:])
    assert rel_err(p_n, p_t) < tol and rel_err(h_n, h_t) < tol
    for a, b in zip(g_n, g_t, strict=True):
        assert rel_err(a, b) < tol


def test_antithetic_pair_gradcheck_float64():
    b, r, shape = 2, 2, (3, 3, 4, 2)
    g = torch.Generator().manual_seed(11)
    loc = torch.randn(b, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    log_var = (0.3 * torch.randn(b, *shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    u = (0.3 * torch.randn(b, r, *shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    xi = torch.randn(b, r, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.antithetic_pair(*t, eps, xi), (loc, log_var, u), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [1, 2, 5, 7, 8])
def test_smoothing_along_rows_narrower_than_the_kernel(width):
    """The W pass splits each row into clamped borders and a clamp-free interior; rows no wider than the 7-tap
    kernel have no interior and overlapping borders."""
    from learnsim.sobolev import separable_filter, sobolev_kernel_1d

    weights = sobolev_kernel_1d(3, 0.5, torch.float64).tolist()
    x = torch.randn(2, 3, 4, 5, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    assert rel_err(ops.smooth(x, weights), separable_filter(x, weights)) < 1e-12
