"""Analytic checks of the coordinate convention, integration, warping, Jacobian and B-splines."""

import math

import pytest
import torch

from learnsim import spatial


def test_zero_velocity_is_identity_exactly():
    v = torch.zeros(2, 3, 7, 9, 11)
    assert torch.equal(spatial.integrate_svf(v, 12), torch.zeros_like(v))
    img = torch.rand(2, 1, 7, 9, 11)
    assert torch.allclose(spatial.warp(img, v), img, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 16, 20)])
def test_constant_velocity_is_translation(shape):
    c = torch.tensor([1.25, -0.75, 2.0])
    v = c.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    disp = spatial.integrate_svf(v, 12)
    inner = disp[:, :, 3:-3, 3:-3, 3:-3]
    assert torch.allclose(inner, c.view(1, 3, 1, 1, 1).expand_as(inner), atol=1e-4)


def test_channel_order_matches_axes_on_non_cubic_grid():
    """Displacing along channel c must shift content along tensor axis 2 + c (the grid_sample order bug)."""
    shape = (10, 14, 18)
    img = torch.zeros(1, 1, *shape)
    img[0, 0, 4, 6, 8] = 1.0
    for c in range(3):
        disp = torch.zeros(1, 3, *shape)
        disp[:, c] = 2.0  # warped(x) = img(x + 2 e_c): the bright voxel appears 2 voxels earlier along axis c
        out = spatial.warp(img, disp)
        idx = [4, 6, 8]
        idx[c] -= 2
        assert out[0, 0, idx[0], idx[1], idx[2]] == pytest.approx(1.0)
        assert out.sum() == pytest.approx(1.0)


def test_inverse_is_exp_of_minus_v_and_error_shrinks():
    torch.manual_seed(0)
    shape = (20, 24, 28)
    v = spatial.gaussian_smooth(torch.randn(1, 3, *shape), 3.0) * 8.0
    errs = []
    for steps in (2, 4, 8):
        fwd = spatial.integrate_svf(v, steps)
        inv = spatial.integrate_svf(-v, steps)
        comp = spatial.compose(fwd, inv)
        errs.append(comp[:, :, 4:-4, 4:-4, 4:-4].abs().max().item())
    assert errs[-1] < 0.05
    assert errs[0] > errs[-1]


def test_jacobian_of_known_affine_map():
    shape = (12, 13, 14)
    a = torch.tensor([[0.1, 0.05, 0.0], [0.0, -0.2, 0.1], [0.02, 0.0, 0.3]])
    x = spatial.identity_grid(shape)
    disp = torch.einsum("ij,bjdhw->bidhw", a, x)
    det = spatial.jacobian_det(disp)
    expected = torch.linalg.det(torch.eye(3) + a)
    assert torch.allclose(det, expected.expand_as(det), atol=1e-5)


def test_folding_map_has_negative_jacobian():
    shape = (10, 10, 10)
    x = spatial.identity_grid(shape)
    disp = torch.zeros(1, 3, *shape)
    disp[:, 0] = -2.0 * x[:, 0]  # x -> -x along axis 0
    assert (spatial.jacobian_det(disp) < 0).all()


def test_bspline_partition_of_unity_and_linear_reproduction():
    shape = (11, 9, 13)
    ks = spatial.bspline_control_shape(shape, 3)
    ones = torch.ones(1, 1, *ks)
    assert torch.allclose(spatial.bspline_to_dense(ones, shape, 3), torch.ones(1, 1, *shape), atol=1e-6)
    # coefficient k at position (k - 1) * s reproduces linear functions exactly
    k = torch.arange(ks[1], dtype=torch.float32)
    coeffs = ((k - 1) * 3).view(1, 1, 1, -1, 1).expand(1, 1, *ks).contiguous()
    dense = spatial.bspline_to_dense(coeffs, shape, 3)
    expected = torch.arange(shape[1], dtype=torch.float32).view(1, 1, 1, -1, 1).expand(1, 1, *shape)
    assert torch.allclose(dense, expected, atol=1e-4)


def test_displacement_to_mm_uses_affine():
    disp = torch.zeros(1, 3, 4, 4, 4)
    disp[:, 0] = 1.0
    affine = torch.tensor([[-2.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    mm = spatial.displacement_to_mm(disp, affine)
    assert torch.allclose(mm[:, 0], torch.full((1, 4, 4, 4), -2.0))
    assert mm[:, 1:].abs().max() == 0


def test_bad_field_shape_is_named():
    with pytest.raises(ValueError, match="v must be"):
        spatial.integrate_svf(torch.zeros(1, 2, 4, 4, 4))
    assert math.isfinite(1.0)
