"""Evaluation metrics: DSC / ASD / HD95 with true (anisotropic) spacing, folding, SDlogJ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from learnsim.evaluation.metrics import (
    STRUCTURES,
    dice_per_structure,
    folding,
    jacobian_stats,
    sdlogj,
    spacing_from_affine,
    structure_metrics,
)
from learnsim.spatial import identity_grid, jacobian_det, warp_labels

SHAPE = (18, 22, 26)  # non-cubic on purpose
# LPS-like, anisotropic and axis-permuted: voxel axis 0 -> world y (2.5 mm), 1 -> world z (1.0 mm), 2 -> world x (0.7 mm)
AFFINE = np.array(
    [
        [0.0, 0.0, -0.7, 40.0],
        [-2.5, 0.0, 0.0, 60.0],
        [0.0, 1.0, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SPACING = (2.5, 1.0, 0.7)


def _box_seg() -> torch.Tensor:
    seg = torch.zeros(SHAPE, dtype=torch.int64)
    seg[4:10, 5:15, 6:20] = 10
    seg[10:13, 3:9, 2:8] = 49  # kept > 3 voxels from the far borders: border padding would smear it
    return seg[None, None]


def test_structure_table() -> None:
    assert len(STRUCTURES) == 15
    assert STRUCTURES[16] == "brain stem"
    pairs = [(10, 49), (11, 50), (12, 51), (13, 52), (17, 53), (18, 54), (26, 58)]
    for left, right in pairs:
        assert STRUCTURES[left].startswith("L ") and STRUCTURES[right].startswith("R ")
        assert STRUCTURES[left][2:] == STRUCTURES[right][2:]


def test_spacing_from_permuted_lps_affine() -> None:
    assert spacing_from_affine(AFFINE) == pytest.approx(SPACING)
    assert spacing_from_affine(torch.as_tensor(AFFINE)) == pytest.approx(SPACING)
    with pytest.raises(ValueError, match="4x4"):
        spacing_from_affine(np.eye(3))


def test_identical_segmentations_are_perfect() -> None:
    seg = _box_seg()
    res = structure_metrics(seg, seg, [10, 49], SPACING)
    for label in (10, 49):
        assert res[label]["dsc"] == pytest.approx(1.0)
        assert res[label]["asd_mm"] == 0.0
        assert res[label]["hd95_mm"] == 0.0
    detj = jacobian_det(torch.zeros(1, 3, *SHAPE))
    count, pct = folding(detj)
    assert int(count[0]) == 0 and float(pct[0]) == 0.0
    assert float(sdlogj(detj)[0]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_plane_asd_is_shift_times_spacing(axis: int, k: int) -> None:
    """A one-voxel-thick plane spanning the grid, shifted by k voxels along its normal: every boundary voxel of
    either plane is exactly k voxels (k * spacing[axis] mm) from the other plane, so the symmetric ASD and HD95 are
    exactly that. (A thicker slab does not give an exact answer: MONAI's boundary includes the slab's sides at the
    grid border, which overlap between the two slabs.)"""
    a = torch.zeros(SHAPE, dtype=torch.int64)
    b = torch.zeros(SHAPE, dtype=torch.int64)
    p = 5
    a.select(axis, p).fill_(10)
    b.select(axis, p + k).fill_(10)
    expected = k * SPACING[axis]
    for pred, ref in ((b, a), (a, b)):  # symmetric
        res = structure_metrics(pred, ref, [10], spacing_from_affine(AFFINE))[10]
        assert res["dsc"] == 0.0
        assert res["asd_mm"] == pytest.approx(expected, rel=1e-6)
        assert res["hd95_mm"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_warp_by_known_shift_recovers_fixed(axis: int) -> None:
    """Moving = fixed shifted by +k along one axis; the pull-back warp with u = +k along that axis undoes it."""
    k = 3
    fixed = _box_seg()
    moving = torch.roll(fixed, shifts=k, dims=2 + axis)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, axis] = k
    warped = warp_labels(moving, disp)
    res = structure_metrics(warped, fixed, [10, 49], SPACING)
    for label in (10, 49):
        assert res[label]["dsc"] == pytest.approx(1.0)
        assert res[label]["asd_mm"] == 0.0
    # and before warping the surface distance is non-zero and anisotropy-aware
    before = structure_metrics(moving, fixed, [10], SPACING)[10]
    assert 0.0 < before["asd_mm"] <= k * SPACING[axis] + 1e-6
    assert before["hd95_mm"] == pytest.approx(k * SPACING[axis], rel=1e-6)


def _reference_surface_metrics(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    """Independent brute force: boundary = voxels minus their 6-neighbourhood erosion (zero outside the grid)."""

    def boundary(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1)
        return (padded & ~ndimage.binary_erosion(padded))[1:-1, 1:-1, 1:-1]

    pa = np.argwhere(boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(boundary(b)) * np.asarray(spacing)
    dab = cKDTree(pb).query(pa)[0]
    dba = cKDTree(pa).query(pb)[0]
    asd = (dab.sum() + dba.sum()) / (dab.size + dba.size)
    hd95 = max(np.percentile(dab, 95), np.percentile(dba, 95))
    return float(asd), float(hd95)


def test_surface_metrics_match_brute_force_with_anisotropic_spacing() -> None:
    rng = np.random.default_rng(0)
    a = np.zeros(SHAPE, dtype=bool)
    a[3:12, 4:16, 5:21] = True
    b = ndimage.binary_dilation(a, iterations=2) & (rng.random(SHAPE) > 0.2)
    b = ndimage.binary_opening(b)
    seg_a = torch.from_numpy(a.astype(np.int64) * 12)
    seg_b = torch.from_numpy(b.astype(np.int64) * 12)
    res = structure_metrics(seg_b, seg_a, [12], SPACING)[12]
    asd, hd95 = _reference_surface_metrics(b, a, SPACING)
    assert res["asd_mm"] == pytest.approx(asd, rel=1e-5)
    assert res["hd95_mm"] == pytest.approx(hd95, rel=1e-4)
    assert res["dsc"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)


def test_absent_structures_are_nan_as_documented() -> None:
    fixed = _box_seg()
    warped = fixed.clone()
    warped[warped == 49] = 0  # present in fixed, absent in warped
    warped[0, 0, 0, 0, 0] = 11  # absent in fixed, present in warped
    res = structure_metrics(warped, fixed, [10, 49, 11, 16], SPACING)
    assert res[10]["dsc"] == pytest.approx(1.0)
    assert res[49]["dsc"] == 0.0 and math.isnan(res[49]["asd_mm"]) and math.isnan(res[49]["hd95_mm"])
    for label in (11, 16):  # absent from the reference: nothing to compare against
        assert all(math.isnan(v) for v in res[label].values())
    assert dice_per_structure(warped, fixed, {10: "x", 49: "y"}) == {10: pytest.approx(1.0), 49: 0.0}


def test_shape_errors_name_the_function() -> None:
    with pytest.raises(ValueError, match="structure_metrics"):
        structure_metrics(
            torch.zeros(4, 4, 4, dtype=torch.int64), torch.zeros(4, 4, 5, dtype=torch.int64), [1], SPACING
        )
    with pytest.raises(ValueError, match="folding"):
        folding(torch.zeros(1, 3, 4, 4, 4))


def _linear_disp(m: np.ndarray) -> torch.Tensor:
    """Displacement of the affine map x -> M x (voxels): u_c = sum_k (M - I)_ck x_k."""
    x = identity_grid(SHAPE, dtype=torch.float64)[0]
    lin = torch.as_tensor(m - np.eye(3), dtype=torch.float64)
    return torch.einsum("ck,kdhw->cdhw", lin, x)[None]


def test_jacobian_of_affine_map_is_its_determinant() -> None:
    m = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.2]])
    detj = jacobian_det(_linear_disp(m))
    assert torch.allclose(detj, torch.full_like(detj, np.linalg.det(m)), atol=1e-10)
    stats = jacobian_stats(_linear_disp(m).float())
    assert stats["folding_voxels"] == 0 and stats["folding_pct"] == 0.0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(stats["folding_pct_mask"])


def test_folding_of_a_reflection() -> None:
    m = np.diag([1.0, -1.0, 1.0])  # orientation-reversing: det J = -1 everywhere
    detj = jacobian_det(_linear_disp(m))
    count, pct = folding(detj)
    assert int(count[0]) == math.prod(SHAPE) and float(pct[0]) == pytest.approx(100.0)
    assert math.isnan(float(sdlogj(detj)[0]))  # no voxel with det J > 0
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:5] = True
    count, pct = folding(detj, mask)
    assert int(count[0]) == 5 * SHAPE[1] * SHAPE[2] and float(pct[0]) == pytest.approx(100.0)


def test_sdlogj_of_known_map_within_mask() -> None:
    """u_0 = a x_0^2 / 2: det J = 1 + a x_0 (central differences are exact for a quadratic away from the border)."""
    a = 0.05
    x0 = identity_grid(SHAPE, dtype=torch.float64)[0, 0]
    disp = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    disp[0, 0] = a * x0**2 / 2
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[1:-1] = True  # the one-sided border differences are not exact
    detj = jacobian_det(disp)
    expected = torch.log(1 + a * x0[mask]).std(correction=0)
    assert float(sdlogj(detj, mask)[0]) == pytest.approx(float(expected), rel=1e-9)
    stats = jacobian_stats(disp, mask[None, None])
    assert stats["sdlogj"] == pytest.approx(float(expected), rel=1e-9)
    assert stats["folding_voxels_mask"] == 0
