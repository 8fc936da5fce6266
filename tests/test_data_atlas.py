"""The atlas is the cohort's: one fixed image per pair list (checked), exposed once by the DataModule."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from learnsim.data.atlas import Atlas
from learnsim.data.datamodule import PairDataModule
from learnsim.data.ukbb import build_ukbb
from learnsim.data.validate import DataValidationError, validate_pairs
from learnsim.grid import Grid

quiet = lambda *_: None  # noqa: E731


def test_dims_int_48_through_datamodule_and_atlas(ukbb_root: Path, tmp_path: Path):
    """``data.dims=48`` (an int, as Hydra passes it) gives a 48^3 working grid everywhere."""
    build_ukbb(ukbb_root, "1000", ["1001", "1002"], tmp_path / "o", test_ids=["1003"], dims=16, log=quiet)
    dm = PairDataModule(tmp_path / "o" / "train.csv", test_csv=tmp_path / "o" / "test.csv", dims=48, shuffle=False)
    assert dm.dims == (48, 48, 48)
    assert dm.atlas is None  # before setup
    dm.setup("fit")
    atlas = dm.atlas
    assert isinstance(atlas, Atlas) and atlas.grid.shape == (48, 48, 48)
    assert atlas.image.shape == atlas.mask.shape == atlas.seg.shape == (1, 1, 48, 48, 48)
    assert atlas.image.dtype == torch.float32 and atlas.seg.dtype == torch.int64
    assert set(torch.unique(atlas.seg).tolist()) == {0, 10, 49}
    # the atlas is built once and is what every item's fixed side repeats
    assert dm.atlas is atlas and dm.train_set.atlas is atlas
    batch = next(iter(dm.train_dataloader()))
    assert batch["moving"].shape == (1, 1, 48, 48, 48)
    assert torch.equal(batch["fixed"], atlas.image) and torch.equal(batch["fixed_seg"], atlas.seg)
    assert np.array_equal(batch["affine"][0].numpy(), atlas.grid.affine)
    # the 16^3 files are resampled onto the 48^3 grid of the same field of view
    cohort_grid = Grid.from_nifti(tmp_path / "o" / "atlas" / "image.nii.gz")
    assert np.allclose(atlas.grid.spacing * 3, cohort_grid.spacing)
    dm.setup("test")
    assert dm.test_set.atlas.grid == atlas.grid


def test_atlas_without_mask_or_seg(ukbb_root: Path, tmp_path: Path):
    build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "o", dims=12, mask_name=None, seg_name=None, log=quiet)
    dm = PairDataModule(tmp_path / "o" / "train.csv", dims=12)
    dm.setup("fit")
    assert dm.atlas.seg is None and not dm.atlas.has_seg
    assert torch.equal(dm.atlas.mask, torch.ones(1, 1, 12, 12, 12))


def test_atlas_shapes_are_checked():
    grid = Grid((4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match=r"Atlas: mask must be \[1, 1, 4, 4, 4\]"):
        Atlas(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5), None, grid, Path("a.nii.gz"))


def test_one_pair_list_names_one_fixed_image(ukbb_root: Path, tmp_path: Path):
    build_ukbb(ukbb_root, "1000", ["1001", "1002"], tmp_path / "o", dims=12, log=quiet)
    csv = tmp_path / "o" / "train.csv"
    lines = csv.read_text().splitlines()
    # a byte-identical copy of the atlas is the same fixed image
    shutil.copyfile(tmp_path / "o" / "atlas" / "image.nii.gz", tmp_path / "o" / "atlas_copy.nii.gz")
    copy = tmp_path / "o" / "copy.csv"
    copy.write_text("\n".join([lines[0], lines[1], lines[2].replace("atlas/image.nii.gz", "atlas_copy.nii.gz", 1)]) + "\n")
    assert len(validate_pairs(copy)) == 2
    # another subject as the fixed image of row 1: one error naming the CSV, the row, the column and the file
    other = tmp_path / "o" / "two_atlases.csv"
    other.write_text(
        "\n".join([lines[0], lines[1], lines[2].replace("atlas/image.nii.gz", "subjects/1001/image.nii.gz", 1)]) + "\n"
    )
    with pytest.raises(DataValidationError) as err:
        validate_pairs(other)
    msg = str(err.value)
    assert str(other) in msg and "row 1 (line 3), column 'fixed', file subjects/1001/image.nii.gz" in msg
    assert "differs from row 0's fixed image atlas/image.nii.gz" in msg
    # the check can be switched off (validation of a list that is not registered to one atlas)
    assert len(validate_pairs(other, single_fixed=False)) == 2


def test_lists_of_one_datamodule_share_the_atlas(ukbb_root: Path, tmp_path: Path):
    build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "a", test_ids=["1003"], dims=12, log=quiet)
    build_ukbb(ukbb_root, "1002", ["1001"], tmp_path / "b", test_ids=["1003"], dims=12, log=quiet)
    dm = PairDataModule(tmp_path / "a" / "train.csv", test_csv=tmp_path / "b" / "test.csv", dims=12)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"b/test.csv, column 'fixed': names .*b/atlas/image.nii.gz, but .*a/train.csv names"):
        dm.setup("test")
