"""The method's anchor: at initialisation the learnt metrics equal their baselines (energy and gradient)."""

import pytest
import torch

from learnsim.energies import RegLossL2
from learnsim.metric import CNNLCC, CNNSSD, build_metric
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth, integrate_svf, warp
from learnsim.transformation import SVF


def _images(shape=(12, 14, 16)):
    g = torch.Generator().manual_seed(0)
    f = gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.0)
    m = gaussian_smooth(torch.rand(2, 1, *shape, generator=g), 1.0)
    norm = lambda x: (x - x.amin()) / (x.amax() - x.amin())  # noqa: E731
    return norm(f), norm(m)


@pytest.mark.parametrize("kind", ["ssd", "lcc"])
def test_dirac_init_equals_baseline_energy_and_gradient(kind):
    torch.manual_seed(0)
    fixed, moving = _images()
    mask = torch.ones_like(fixed)
    mask[..., :2] = 0
    learnt = build_metric(f"cnn_{kind}")
    base = build_metric(kind)
    v = (torch.randn(2, 3, *fixed.shape[2:]) * 0.5).requires_grad_(True)
    grads, energies = [], []
    for metric in (learnt, base):
        warped = warp(moving, integrate_svf(v, 6))
        e = metric(fixed, warped, mask)
        (g,) = torch.autograd.grad(e.sum(), v)
        energies.append(e.detach())
        grads.append(g)
    assert torch.allclose(energies[0], energies[1], rtol=1e-5, atol=1e-5)
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 1e-4, rel


def test_learnable_false_is_plain_baseline():
    m = CNNSSD(learnable=False)
    assert m.encoder is None and len(list(m.parameters())) == 0
    assert CNNLCC(learnable=False).encoder is None


def test_dirac_init_structure():
    m = CNNSSD(no_features=(4, 8, 8))
    for conv in m.encoder.convs:
        centre = conv.weight[:, :, 1, 1, 1]
        assert (centre >= 0).all()
        assert torch.allclose(centre.sum(0), torch.ones(conv.weight.shape[1]))
        off = conv.weight.clone()
        off[:, :, 1, 1, 1] = 0
        assert off.abs().max() < 1e-5
    assert torch.equal(m.encoder.aggregation.weight, torch.ones_like(m.encoder.aggregation.weight))


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="unknown metric 'mi'"):
        build_metric("mi")


def test_q_v_fit_recovers_translation_on_non_cubic_volume():
    """A blob shifted along each axis of a 20x24x28 grid: q_v's mean must undo the shift along the right axis."""
    shape = (20, 24, 28)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    centre = torch.tensor([10.0, 12.0, 14.0]).view(3, 1, 1, 1)
    scale = torch.tensor([4.0, 5.0, 6.0]).view(3, 1, 1, 1)
    blob = lambda c: torch.exp(-(((x - c) / scale) ** 2).sum(0) * 0.5)[None, None]  # noqa: E731
    fixed = blob(centre)
    shift = torch.tensor([1.5, -1.0, 2.0]).view(3, 1, 1, 1)
    moving = blob(centre + shift)  # M(x + shift) = F(x): the ideal displacement is +shift
    reg = VariationalRegistration(
        CNNSSD(learnable=False), SVF(6), RegLossL2(0.5), SobolevSmoother(True, 3, 0.5),
        no_iters=300, lr=0.05, sigma_init=0.05, u_init=0.01, uniform_noise=0.0,
    )
    torch.manual_seed(0)
    fit = reg.fit(fixed, moving)
    disp = reg.mean_displacement(fit.params, shape)
    inner = (x[0] > 6) & (x[0] < 14) & (x[1] > 7) & (x[1] < 17) & (x[2] > 8) & (x[2] < 20)
    est = torch.stack([disp[0, c][inner].mean() for c in range(3)])
    assert torch.allclose(est, shift.flatten(), atol=0.35), est
    before = 0.5 * ((fixed - moving) ** 2).sum()
    after = 0.5 * ((fixed - warp(moving, disp)) ** 2).sum()
    assert after < 0.1 * before


def test_svffd_fit_uses_control_grid_and_recovers_translation():
    """The B-spline SVF: q_v lives on the control grid (spacing 4), the dense field still undoes a shift."""
    from learnsim.transformation import SVFFD

    shape = (16, 20, 24)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    blob = lambda c: torch.exp(-(((x - c.view(3, 1, 1, 1)) / 4.0) ** 2).sum(0) * 0.5)[None, None]  # noqa: E731
    fixed, moving = blob(torch.tensor([8.0, 10.0, 12.0])), blob(torch.tensor([9.0, 10.0, 11.0]))
    reg = VariationalRegistration(
        CNNSSD(learnable=False), SVFFD(6, cps=4), RegLossL2(0.5), SobolevSmoother(False),
        no_iters=200, lr=0.05, sigma_init=0.05, u_init=0.01, uniform_noise=0.0,
    )
    torch.manual_seed(0)
    fit = reg.fit(fixed, moving)
    assert fit.params.loc.shape == (1, 3, 7, 8, 9)  # (n - 1) // 4 + 4 control points per axis
    disp = reg.mean_displacement(fit.params, shape)
    centre = disp[0, :, 6:11, 8:13, 10:15].mean(dim=(1, 2, 3))
    assert torch.allclose(centre, torch.tensor([1.0, 0.0, -1.0]), atol=0.3), centre
