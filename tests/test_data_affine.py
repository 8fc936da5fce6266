"""The affine registration of the demo's sources (learnsim.data.affine) on a known affine, and the orientation of a
FreeSurfer-conformed (LIA) volume through the preprocessing (offline: phantoms; the real S1 header if cached)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from learnsim.data.affine import correlation, fit_affine, foreground, moments_init
from learnsim.data.preprocess import Volume, preprocess, resample_to_grid, target_grid
from learnsim.data.sources import SOURCES, _normalise, cache_root
from learnsim.grid import Grid


def _phantom(n: int = 48, spacing: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom: an ellipsoid with an asymmetric inner structure (so rotations are observable)."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -spacing * (n - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    xyz = (ijk @ aff[:3, :3].T + aff[:3, 3]).reshape(n, n, n, 3)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    img = 0.4 * ((x / 55) ** 2 + (y / 65) ** 2 + (z / 48) ** 2 < 1)
    for c, s, a in (((20, 15, 5), 9, 0.6), ((-15, -25, 10), 7, 0.5), ((5, 30, -15), 6, 0.4), ((-25, 5, -10), 8, -0.3)):
        img = img + a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s**2))
    img = img + 0.3 * ((np.abs(y + 10) < 6) & (np.abs(x) < 30) & (np.abs(z) < 20))  # a bar along x
    return ndimage.gaussian_filter(img, 0.7).astype(np.float32), aff


def _known_affine() -> np.ndarray:
    rz, rx = np.deg2rad(9.0), np.deg2rad(-6.0)
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    w = np.eye(4)
    w[:3, :3] = rot_z @ rot_x @ np.diag([1.08, 0.94, 1.04])
    w[:3, 3] = [7.0, -5.0, 6.0]
    return w


def test_fit_affine_recovers_a_known_affine():
    fixed, f_aff = _phantom()
    w_true = _known_affine()
    # the same voxels with a header that puts them at W_true^-1 (world): W_true brings them back onto the fixed image
    m_aff = np.linalg.inv(w_true) @ f_aff
    fit = fit_affine(fixed, m_aff, fixed, f_aff, levels=(16, 32), iters=(150, 80))
    fg = np.argwhere(fixed > 0.2)
    pts = np.c_[fg @ f_aff[:3, :3].T + f_aff[:3, 3], np.ones(len(fg))]
    init = moments_init(foreground(fixed), m_aff, foreground(fixed), f_aff, scale=False)
    err_init = np.linalg.norm(pts @ (init - w_true)[:3].T, axis=1).max()
    err = np.linalg.norm(pts @ (fit.world - w_true)[:3].T, axis=1).max()
    assert err_init > 8.0  # the moments start is far off (rotation and anisotropic scale)
    assert err < 0.5, f"largest error over the phantom {err:.2f} mm (voxels 3 mm; moments start {err_init:.1f} mm)"
    assert fit.ncc > 0.99 and fit.ncc > fit.ncc_init


def test_fit_affine_is_deterministic():
    fixed, f_aff = _phantom(32, 4.5)
    m_aff = np.linalg.inv(_known_affine()) @ f_aff
    a = fit_affine(fixed, m_aff, fixed, f_aff, levels=(16,), iters=(40,))
    b = fit_affine(fixed, m_aff, fixed, f_aff, levels=(16,), iters=(40,))
    assert np.array_equal(a.world, b.world)


def test_correlation():
    rng = np.random.default_rng(0)
    a = rng.random((8, 8, 8))
    assert correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert correlation(a, -a) == pytest.approx(-1.0)
    mask = np.zeros(a.shape, bool)
    mask[:4] = True
    b = a.copy()
    b[4:] = rng.random((4, 8, 8))  # differs only outside the mask
    assert correlation(a, b, mask) == pytest.approx(1.0)


# A FreeSurfer-conformed header (LIA): voxel axis i runs to the Left, j to Inferior, k to Anterior.
LIA = np.array([[-2.0, 0, 0, 32.0], [0, 0, 2.0, -32.0], [0, -2.0, 0, 32.0], [0, 0, 0, 1]])


def test_conformed_lia_volume_lands_where_its_header_says():
    assert "".join(nib.aff2axcodes(LIA)) == "LIA"
    vol = np.zeros((32, 32, 32), np.float32)
    vol[5, 20, 9] = 1.0  # world: (-10 + 32, 18 - 32, -40 + 32) = (22, -14, -8) mm, i.e. right, posterior, inferior
    world = LIA @ np.array([5, 20, 9, 1.0])
    assert np.allclose(world[:3], [22.0, -14.0, -8.0])
    # a RAS target grid with the same 2 mm voxels, covering the volume
    grid = Grid((40, 40, 40), np.array([[2.0, 0, 0, -40], [0, 2.0, 0, -40], [0, 0, 2.0, -40], [0, 0, 0, 1]]))
    out = resample_to_grid(vol, LIA, grid, "mask")
    hit = np.argwhere(out > 0)
    assert hit.tolist() == [[31, 13, 16]]  # RAS voxel of (22, -14, -8): ((22 + 40) / 2, (-14 + 40) / 2, (-8 + 40) / 2)
    # through the demo's preprocessing (canonical cube, resized): the marker keeps its world position
    g = target_grid((32, 32, 32), LIA, 32)
    assert "".join(nib.aff2axcodes(g.affine)) == "RAS"
    p = preprocess(Volume(vol, LIA), g)
    ijk = np.unravel_index(np.argmax(p.image), p.image.shape)
    assert np.allclose(g.affine[:3, :3] @ np.array(ijk) + g.affine[:3, 3], world[:3], atol=1e-6)


def test_real_pycortex_s1_header_is_lia_if_cached():
    src = SOURCES["pycortex_s1_t1"]
    path = cache_root() / "files" / f"{_normalise(src.package)}-{src.version}" / src.member
    if not path.is_file():
        pytest.skip("pycortex S1 not in the download cache (learnsim-data fetch)")
    img = nib.load(str(path))
    assert img.shape == (256, 256, 256) and "".join(nib.aff2axcodes(img.affine)) == "LIA"
    a = img.affine
    # voxel (0, 0, 0) and one step along each axis: i -> left (x down), j -> inferior (z down), k -> anterior (y up)
    assert np.allclose(a[:3, 3], [125.81, -94.57, 133.34], atol=0.01)
    assert np.allclose(a[:3, :3], [[-1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-5)
