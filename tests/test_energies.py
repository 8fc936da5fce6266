"""Energies, entropy and the Sobolev smoother against closed forms and torch.distributions."""

import math

import pytest
import torch

from learnsim import energies
from learnsim.distributions import LowRankParams, antithetic_samples, init_q_v
from learnsim.sobolev import SobolevSmoother, sobolev_kernel_1d


def test_ssd_closed_form_and_mask():
    f = torch.rand(2, 1, 5, 6, 7)
    m = torch.rand(2, 1, 5, 6, 7)
    mask = (torch.rand(2, 1, 5, 6, 7) > 0.5).float()
    expected = 0.5 * (((f - m) ** 2) * mask).flatten(1).sum(1)
    assert torch.allclose(energies.ssd(f, m, mask), expected)


def test_lcc_matches_naive_window_computation():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 6, 7, 8)
    m = torch.rand(1, 1, 6, 7, 8)
    terms = energies.lcc_terms(f, m, radius=1)
    fp = torch.nn.functional.pad(f, (1,) * 6, mode="replicate")[0, 0]
    mp = torch.nn.functional.pad(m, (1,) * 6, mode="replicate")[0, 0]
    d, h, w = 3, 4, 5
    wf = fp[d : d + 3, h : h + 3, w : w + 3].flatten()
    wm = mp[d : d + 3, h : h + 3, w : w + 3].flatten()
    cross = ((wf - wf.mean()) * (wm - wm.mean())).sum()
    vf = ((wf - wf.mean()) ** 2).sum()
    vm = ((wm - wm.mean()) ** 2).sum()
    assert terms[0, 0, d, h, w].item() == pytest.approx((cross**2 / (vf * vm + 1e-5)).item(), rel=1e-4)


def test_lcc_of_image_with_itself_is_minimal():
    torch.manual_seed(1)
    f = torch.rand(1, 1, 10, 10, 10)
    self_energy = energies.lcc(f, f)
    for _ in range(5):
        other = (f + 0.2 * torch.randn_like(f)).clamp(0, 1)
        assert energies.lcc(f, other) > self_energy
    # LCC is invariant to affine intensity changes, as a minimum should be
    assert torch.allclose(energies.lcc(f, 0.5 * f + 0.2), self_energy, rtol=1e-3)


def test_l2_regulariser_closed_form():
    x = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 3, 5, 4, 3)
    # derivative 1 along D for every component: 4 differences x (4*3) columns x 3 components
    assert energies.l2_gradient_energy(x, 2.0).item() == pytest.approx(0.5 * 2.0 * 4 * 12 * 3)


@pytest.mark.parametrize("rank", [1, 3])
def test_entropy_matches_torch_distributions(rank):
    torch.manual_seed(0)
    event = (3, 2, 3, 2)
    n = math.prod(event)
    log_var = torch.randn(2, *event) * 0.3
    u = torch.randn(2, rank, *event) * 0.2
    ours = energies.low_rank_entropy(log_var, u) + energies.entropy_constant(n)
    for b in range(2):
        dist = torch.distributions.LowRankMultivariateNormal(
            torch.zeros(n), u[b].reshape(rank, n).T, log_var[b].exp().reshape(n)
        )
        assert ours[b].item() == pytest.approx(dist.entropy().item(), rel=1e-5)


def test_antithetic_samples_are_symmetric_and_have_the_right_covariance():
    torch.manual_seed(0)
    p = init_q_v(1, (1, 2, 1, 1), sigma_init=0.5, u_init=0.3)
    p = LowRankParams(p.loc + 1.0, p.log_var, p.u)
    draws = torch.stack([torch.cat(antithetic_samples(p)) for _ in range(20000)]).reshape(-1, 2)
    a, b = antithetic_samples(p, torch.Generator().manual_seed(3))
    assert torch.allclose(a + b, 2 * p.loc)
    cov = torch.cov(draws.T)
    expected = torch.diag(torch.full((2,), 0.25)) + 0.09
    assert torch.allclose(cov, expected, atol=0.01)
    assert torch.allclose(draws.mean(0), torch.ones(2), atol=0.01)


def test_sobolev_kernel_closed_form_and_identity_backward():
    s, lam = 3, 0.5
    k = sobolev_kernel_1d(s, lam)
    n = 2 * s + 1
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        a[i, i] = 1 + 2 * lam
        if i > 0:
            a[i, i - 1] = -lam
        if i < n - 1:
            a[i, i + 1] = -lam
    col = torch.linalg.solve(a, torch.eye(n, dtype=torch.float64)[:, s])
    assert torch.allclose(k, col / col.sum())
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(k, k.flip(0))

    smoother = SobolevSmoother(True, s, lam)
    x = torch.randn(1, 3, 9, 10, 11, requires_grad=True)
    y = smoother(x)
    # forward smooths: a constant field is unchanged, a noisy one loses variance
    assert torch.allclose(smoother(torch.ones(1, 3, 9, 10, 11)), torch.ones(1, 3, 9, 10, 11), atol=1e-6)
    assert y.var() < x.var()
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad, g)
    assert SobolevSmoother(False)(x) is x


def test_lcc_is_computed_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 10, 11, 12)
    m = (f + 0.1 * torch.randn_like(f)).clamp(0, 1)
    ref = energies.lcc(f, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = energies.lcc(f.bfloat16(), m.bfloat16())
    assert low.dtype == torch.float32
    assert torch.allclose(low, ref, rtol=1e-2)
