"""learnsim.grid: the Grid object, dims normalisation and the one affine converter pair."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from learnsim.grid import Grid, affine_to_numpy, affine_to_tensor, as_dims


def _oblique_affine() -> np.ndarray:
    """LPS-like, anisotropic (1.5, 2, 3 mm), rotated 20 degrees about the first world axis, with an offset."""
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-1.5, -2.0, 3.0])
    a[:3, 3] = [90.0, 120.0, -70.0]
    return a


def test_affine_round_trip_numpy_tensor_numpy():
    a = _oblique_affine()
    t = affine_to_tensor(a)
    assert t.dtype == torch.float64 and t.shape == (4, 4)
    back = affine_to_numpy(t)
    assert back.dtype == np.float64 and np.array_equal(back, a)
    # float32 on request (the registration's working precision); values rounded, not reinterpreted
    t32 = affine_to_tensor(a, dtype=torch.float32)
    assert t32.dtype == torch.float32 and np.allclose(affine_to_numpy(t32), a, atol=1e-4)
    # a tensor from a grid never aliases the grid's read-only affine
    g = Grid((4, 5, 6), a)
    gt = g.affine_tensor()
    gt[0, 0] = 123.0
    assert g.affine[0, 0] == a[0, 0]


def test_affine_shapes_are_checked():
    with pytest.raises(ValueError, match="affine must be 4x4"):
        affine_to_numpy(np.eye(3))
    with pytest.raises(ValueError, match="affine must be 4x4"):
        affine_to_tensor(np.stack([np.eye(4)] * 2))
    batch = affine_to_tensor(np.stack([np.eye(4), _oblique_affine()]), batched=True)
    assert batch.shape == (2, 4, 4) and torch.equal(batch[1], affine_to_tensor(_oblique_affine()))


def test_spacing_and_orientation():
    g = Grid((10, 11, 12), _oblique_affine())
    assert np.allclose(g.spacing, [1.5, 2.0, 3.0])
    assert g.orientation[0] == "L"
    assert Grid((2, 2, 2), np.diag([2.0, 2.0, 2.0, 1.0])).orientation == "RAS"


def test_grid_from_nifti_reads_the_header(tmp_path: Path):
    a = _oblique_affine()
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((7, 8, 9), np.float32), a), str(path))
    g = Grid.from_nifti(path)
    assert g.shape == (7, 8, 9) and np.allclose(g.affine, a, atol=1e-5)
    assert g == Grid.from_image(nib.load(str(path)))
    assert Grid.from_dict(g.to_dict()) == g
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        Grid.from_nifti(tmp_path / "missing.nii.gz")


def test_grid_equality_tolerance_and_immutability():
    a = _oblique_affine()
    g = Grid((4, 4, 4), a)
    assert g == Grid((4, 4, 4), a + 1e-6) and g != Grid((4, 4, 4), a + 1e-2) and g != Grid((4, 4, 5), a)
    assert g == Grid((4, 4, 4), torch.from_numpy(a))
    with pytest.raises(ValueError):
        g.affine[0, 0] = 1.0  # read-only


@pytest.mark.parametrize(
    ("dims", "expected"), [(48, (48, 48, 48)), (np.int64(32), (32, 32, 32)), ([16, 24, 32], (16, 24, 32)), ((8, 8, 8), (8, 8, 8))]
)
def test_as_dims(dims, expected):
    assert as_dims(dims) == expected


@pytest.mark.parametrize("bad", [1, (4, 4), (4, 4, 4, 4), (1, 8, 8)])
def test_as_dims_rejects(bad):
    with pytest.raises(ValueError, match="dims must be"):
        as_dims(bad)
