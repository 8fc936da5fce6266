"""Uncertainty (displacement std in mm) and its calibration analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learnsim.evaluation.uncertainty import (
    DisagreementCounter,
    calibration_bins,
    displacement_std_mm,
    segmentation_disagreement,
    segmentation_error,
    spearman,
    subsample_region,
)

SHAPE = (6, 7, 8)
# rotation (axis permutation with flips) times anisotropic spacing: column norms (2.5, 1.0, 0.7)
AFFINE = np.array(
    [
        [0.0, 0.0, -0.7, 40.0],
        [-2.5, 0.0, 0.0, 60.0],
        [0.0, 1.0, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SPACING = (2.5, 1.0, 0.7)


def test_identical_samples_have_zero_uncertainty() -> None:
    base = torch.randn(1, 1, 3, *SHAPE) * 5
    samples = base.expand(7, 1, 3, *SHAPE).clone()
    unc = displacement_std_mm(samples, AFFINE)
    assert unc.shape == (1, 1, *SHAPE)
    assert torch.count_nonzero(unc) == 0
    assert displacement_std_mm(samples[:1], AFFINE).abs().max() == 0  # a single sample


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_antithetic_spread_gives_its_magnitude_in_mm(channel: int) -> None:
    """Samples mu +/- a e_c: the population std is a along voxel axis c, i.e. a * spacing[c] mm in any world frame."""
    a = 0.8
    mu = torch.randn(1, 3, *SHAPE)
    delta = torch.zeros(1, 3, *SHAPE)
    delta[:, channel] = a
    samples = torch.stack([mu + delta, mu - delta])
    unc = displacement_std_mm(samples, AFFINE)
    assert torch.allclose(unc, torch.full_like(unc, a * SPACING[channel]), rtol=1e-5)
    comps = displacement_std_mm(samples, torch.as_tensor(AFFINE), reduce="components")
    assert comps.shape == (1, 3, *SHAPE)
    # world axis of voxel axis c is the row where the affine's column c is non-zero
    world = int(np.flatnonzero(AFFINE[:3, channel])[0])
    assert torch.allclose(comps[:, world], torch.full_like(comps[:, world], a * SPACING[channel]), rtol=1e-5)
    others = [w for w in range(3) if w != world]
    assert comps[:, others].abs().max() < 1e-5


def test_known_spread_population_and_unbiased() -> None:
    offsets = torch.tensor([-3.0, -1.0, 1.0, 3.0])  # population var 5, unbiased var 20/3
    iso = np.diag([2.0, 2.0, 2.0, 1.0])
    samples = torch.zeros(4, 2, 3, *SHAPE)  # batch of 2
    samples[:, :, 0] = offsets.view(4, 1, 1, 1, 1)
    samples[:, :, 2] = 2 * offsets.view(4, 1, 1, 1, 1)  # var 4x along W
    pop = displacement_std_mm(samples, iso)
    assert pop.shape == (2, 1, *SHAPE)
    assert torch.allclose(pop, torch.full_like(pop, 2.0 * math.sqrt(5 + 20)), rtol=1e-5)
    unb = displacement_std_mm(samples, iso, correction=1)
    assert torch.allclose(unb, torch.full_like(unb, 2.0 * math.sqrt(5 * 20 / 3)), rtol=1e-5)


def test_random_samples_match_torch_reference() -> None:
    torch.manual_seed(0)
    samples = (
        torch.randn(9, 1, 3, *SHAPE) * 2 + 50
    )  # large offset: the shifted accumulation keeps it accurate
    lin = torch.as_tensor(AFFINE[:3, :3], dtype=torch.float64)
    mm = torch.einsum("ij,nbjdhw->nbidhw", lin, samples.double())
    ref = mm.var(dim=0, correction=0).sum(1, keepdim=True).sqrt()
    assert torch.allclose(displacement_std_mm(samples, AFFINE).double(), ref, atol=1e-4)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="displacement_std_mm"):
        displacement_std_mm(torch.zeros(2, 3, *SHAPE), AFFINE)
    with pytest.raises(ValueError, match="4x4"):
        displacement_std_mm(torch.zeros(2, 1, 3, *SHAPE), np.eye(3))


def test_disagreement_fraction_off_majority() -> None:
    segs = torch.zeros(4, 1, 1, *SHAPE, dtype=torch.int64)
    segs[:, ..., 0, 0, 0] = torch.tensor([10, 10, 10, 49]).view(4, 1, 1)  # 1 of 4 off
    segs[:, ..., 1, 0, 0] = torch.tensor([10, 49, 10, 49]).view(4, 1, 1)  # tie: 2 of 4 off
    segs[:, ..., 2, 0, 0] = torch.tensor([77, 0, 99, 0]).view(
        4, 1, 1
    )  # non-structures count as background: agree
    segs[:, ..., 3, 0, 0] = torch.tensor([10, 49, 11, 0]).view(4, 1, 1)  # all different: 3 of 4 off
    dis = segmentation_disagreement(segs, [10, 49, 11])
    assert dis.shape == (1, 1, *SHAPE)
    assert dis[0, 0, :4, 0, 0].tolist() == pytest.approx([0.25, 0.5, 0.0, 0.75])
    assert dis[0, 0, 4:].abs().max() == 0
    counter = DisagreementCounter({10: "a"}, SHAPE)
    with pytest.raises(RuntimeError):
        counter.compute()


def test_segmentation_error() -> None:
    fixed = torch.zeros(1, 1, *SHAPE, dtype=torch.int64)
    fixed[..., 2:4, 2:4, 2:4] = 10
    warped = fixed.clone()
    warped[..., 2, 2, 2] = 49
    warped[..., 0, 0, 0] = 123  # not evaluated: background
    err = segmentation_error(warped, fixed, [10, 49])
    assert err.dtype == torch.bool and int(err.sum()) == 1 and bool(err[0, 0, 2, 2, 2])


def test_calibration_bins_and_spearman() -> None:
    u = np.linspace(0.0, 1.0, 100)
    err = (u > 0.5).astype(float)
    bins = calibration_bins(u, {"error": err, "disagreement": u**2}, n_bins=4)
    assert list(bins.columns) == [
        "bin",
        "u_lo",
        "u_hi",
        "u_mean",
        "n_voxels",
        "error_mean",
        "disagreement_mean",
    ]
    assert bins["n_voxels"].tolist() == [25, 25, 25, 25]
    assert bins["u_mean"].is_monotonic_increasing
    assert bins["error_mean"].tolist() == [0.0, 0.0, 1.0, 1.0]
    # ties in the uncertainty never empty a bin
    tied = calibration_bins(np.zeros(10), {"error": np.arange(10.0)}, n_bins=3)
    assert tied["n_voxels"].tolist() == [4, 3, 3]
    assert calibration_bins(np.array([]), {"error": np.array([])}).empty
    assert spearman(u, u**3) == pytest.approx(1.0)
    assert spearman(u, -u) == pytest.approx(-1.0)
    assert math.isnan(spearman(u, np.ones_like(u)))


def test_subsample_region_is_seeded_and_inside_the_mask() -> None:
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[1:5, 2:6, 3:7] = True
    a = subsample_region(mask, SHAPE, 20, seed=3)
    b = subsample_region(mask, SHAPE, 20, seed=3)
    assert np.array_equal(a, b) and a.size == 20 and np.unique(a).size == 20
    assert mask.reshape(-1)[torch.from_numpy(a)].all()
    assert subsample_region(mask, SHAPE, 10_000).size == int(mask.sum())
    assert subsample_region(None, SHAPE, 10_000).size == math.prod(SHAPE)
