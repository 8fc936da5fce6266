"""Dataset, DataModule and the UK Biobank layout on a synthetic cohort (different orientations/spacings per subject)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learnsim.cli.data import main as cli_main
from learnsim.data.datamodule import PairDataModule
from learnsim.data.dataset import BATCH_KEYS, PairDataset
from learnsim.data.preprocess import match_histogram
from learnsim.data.ukbb import UKBB_IMAGE, UKBB_SEG, build_ukbb, read_ids
from learnsim.data.validate import DataValidationError

quiet = lambda *_: None  # noqa: E731


def test_read_ids(ukbb_root: Path):
    assert read_ids(ukbb_root.parent / "train.txt") == ["1000", "1001", "1002"]
    assert read_ids(ukbb_root.parent / "test.txt") == ["1003", "1004"]


def test_ukbb_preprocessed_and_linked_give_the_same_tensors(ukbb_root: Path, tmp_path: Path):
    out = tmp_path / "pre"
    assert (
        cli_main(
            [
                "ukbb",
                "--root",
                str(ukbb_root),
                "--atlas",
                "1000",
                "--ids",
                str(tmp_path / "train.txt"),
                "--test-ids",
                str(tmp_path / "test.txt"),
                "--out",
                str(out),
                "--dims",
                "20",
            ]
        )
        == 0
    )
    assert (out / "val.csv").read_text().strip() == "fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg"
    pre = PairDataset(out / "train.csv", dims=20, structures=[10, 49])
    assert len(pre) == 2 and pre.pair_ids == ["1001", "1002"]  # the atlas is left out of the moving subjects
    assert pre.notes == []  # written on the working grid: no second interpolation
    build_ukbb(
        ukbb_root,
        "1000",
        ["1000", "1001", "1002"],
        tmp_path / "link",
        dims=20,
        link_originals=True,
        log=quiet,
    )
    raw = PairDataset(tmp_path / "link" / "train.csv", dims=20, structures=[10, 49])
    assert any("resampled" in n for n in raw.notes)
    for i in range(2):
        a, b = pre[i], raw[i]
        for k in BATCH_KEYS:
            if isinstance(a[k], torch.Tensor):
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
            elif k != "pair_key":  # other files, other pair identity
                assert a[k] == b[k]
    # left structure on the left of the RAS grid for a subject stored LAS
    it = pre[0]
    left = np.argwhere(it["moving_seg"][0].numpy() == 10).mean(0)
    right = np.argwhere(it["moving_seg"][0].numpy() == 49).mean(0)
    assert left[0] < right[0]  # RAS: index along axis 0 grows to the right


def test_ukbb_reports_all_missing_files(ukbb_root: Path, tmp_path: Path):
    (ukbb_root / "1001" / UKBB_SEG).unlink()
    with pytest.raises(DataValidationError) as err:
        build_ukbb(ukbb_root, "1000", ["1001", "9999"], tmp_path / "o", dims=16, log=quiet)
    msgs = err.value.problems
    assert any("1001" in m and "seg" in m for m in msgs)
    assert sum("9999" in m for m in msgs) == 3  # image, mask and seg of the unknown subject
    assert not (tmp_path / "o").exists()  # nothing written


def test_ukbb_rerun_skips_finished(ukbb_root: Path, tmp_path: Path, capsys):
    kw = dict(root=ukbb_root, atlas_id="1000", train_ids=["1001"], out=tmp_path / "o", dims=16)
    build_ukbb(**kw)
    first = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    capsys.readouterr()
    build_ukbb(**kw)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == first


def test_datamodule_batches(ukbb_root: Path, tmp_path: Path):
    build_ukbb(
        ukbb_root, "1000", ["1001", "1002", "1003"], tmp_path / "o", test_ids=["1004"], dims=16, log=quiet
    )
    dm = PairDataModule(
        tmp_path / "o" / "train.csv",
        None,
        tmp_path / "o" / "test.csv",
        dims=[16, 16, 16],
        batch_size=2,
        structures=[10, 49],
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(BATCH_KEYS)
    assert batch["fixed"].shape == (2, 1, 16, 16, 16) and batch["moving_seg"].dtype == torch.int64
    assert (
        batch["has_seg"].dtype == torch.bool
        and batch["index"].dtype == torch.int64
        and len(batch["pair_id"]) == 2
    )
    assert batch["affine"].shape == (2, 4, 4) and batch["affine"].dtype == torch.float64
    assert dm.val_dataloader() == []  # no validation list: Lightning skips validation
    dm.setup("test")
    tb = list(dm.test_dataloader())
    assert len(tb) == 1 and tb[0]["fixed"].shape[0] == 1 and tb[0]["pair_id"] == ["1004"]


def test_dataset_without_masks_or_segs(ukbb_root: Path, tmp_path: Path):
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving\n{ukbb_root / '1000' / UKBB_IMAGE},{ukbb_root / '1001' / UKBB_IMAGE}\n")
    item = PairDataset(csv, dims=12)[0]
    assert (item["fixed_mask"] == 1).all() and (item["moving_seg"] == 0).all() and not item["has_seg"].item()
    assert item["pair_id"] == "1001"


def test_datamodule_shards_pairs_by_rank(ukbb_root: Path, tmp_path: Path):
    ids = ["1001", "1002", "1003", "1004"]
    build_ukbb(ukbb_root, "1000", ids, tmp_path / "o", dims=12, log=quiet)
    seen = []
    for rank in range(2):
        dm = PairDataModule(tmp_path / "o" / "train.csv", dims=12, shuffle=True)
        dm._rank_world = lambda r=rank: (r, 2)  # what a 2-process Trainer reports
        dm.setup("fit")
        rows = [int(b["index"]) for b in dm.train_dataloader()]
        assert sorted(rows) == [i for i in range(4) if i % 2 == rank]
        seen += rows
    assert sorted(seen) == [0, 1, 2, 3]
    atlas = dm.atlas
    assert atlas.image.shape == (1, 1, 12, 12, 12) and torch.equal(atlas.image[0], dm.train_set[0]["fixed"])
    assert torch.equal(atlas.mask[0], dm.train_set[0]["fixed_mask"]) and torch.equal(atlas.seg[0], dm.train_set[0]["fixed_seg"])
    assert atlas.grid == dm.train_set.grid and np.array_equal(atlas.grid.affine, dm.train_set[0]["affine"].numpy())


def test_dataset_histogram_matching(ukbb_root: Path, tmp_path: Path):
    build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "o", dims=16, log=quiet)
    csv = tmp_path / "o" / "train.csv"
    plain = PairDataset(csv, dims=16)[0]
    matched = PairDataset(csv, dims=16, intensity="histmatch")[0]
    inside_m = matched["moving_mask"] > 0
    expected = match_histogram(
        plain["moving"][0].numpy(), plain["moving_mask"][0].numpy(), plain["fixed"][0].numpy(), plain["fixed_mask"][0].numpy()
    )
    assert torch.equal(matched["moving"][0], torch.from_numpy(expected))
    assert (matched["moving"][~inside_m] == 0).all()
    assert torch.equal(matched["fixed"], plain["fixed"]) and torch.equal(matched["moving_seg"], plain["moving_seg"])
    with pytest.raises(ValueError, match="train.csv: data.intensity must be"):
        PairDataset(csv, dims=16, intensity="zscore")
