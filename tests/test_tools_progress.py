"""Cohort builders: progress ("k of N", time left) and the one pair-row constructor."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from learnsim.data.cohort import CSV_COLUMNS, pair_row, subject_files
from learnsim.data.progress import Progress, format_duration
from learnsim.data.ukbb import UKBB_IMAGE, UKBB_MASK, UKBB_SEG, build_ukbb
from learnsim.io import save_nifti


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.2, 42.4, 185, 3725)] == ["<1 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_progress_counts_and_estimates_time_left() -> None:
    clock, lines = _Clock(), []
    p = Progress(4, "x", lines.append, bar=False, clock=clock)
    assert p.remaining() is None and p.status() == "0/4 (<1 s)"
    clock.t += 10
    p.step("[learnsim-data] a: written")
    clock.t += 30  # a slower second subject: the estimate follows the mean
    p.step("[learnsim-data] b: written")
    p.log("[learnsim-data]   a note")  # not a step: no prefix, no count
    clock.t += 20
    p.step("[learnsim-data] c: up to date")
    clock.t += 20
    p.step("[learnsim-data] d: written")
    assert lines == [
        "[learnsim-data] 1/4 (10 s, ~30 s left) a: written",
        "[learnsim-data] 2/4 (40 s, ~40 s left) b: written",
        "[learnsim-data]   a note",
        "[learnsim-data] 3/4 (1 min 00 s, ~20 s left) c: up to date",
        "[learnsim-data] 4/4 (1 min 20 s, done) d: written",
    ]


def test_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(3, "cohort", bar=True) as p:
        for name in "abc":
            p.step(f"[learnsim-data] {name}: written")
    out = capsys.readouterr()
    assert "[learnsim-data] c: written" in out.out + out.err
    assert re.search(r"cohort: 100%.*3/3", out.err)  # tqdm: k of N, elapsed<left


def test_pair_row_and_subject_files() -> None:
    atlas = subject_files("atlas", {"atlas/t1.nii.gz": "h", "atlas/mask.nii.gz": "h", "atlas/seg.nii.gz": "h"})
    unlabelled = subject_files("subjects/s1", {"subjects/s1/t1.nii.gz": "h", "subjects/s1/mask.nii.gz": "h"})
    row = pair_row(atlas, unlabelled)
    assert list(row) == list(CSV_COLUMNS)
    assert row == {
        "fixed": "atlas/t1.nii.gz", "moving": "subjects/s1/t1.nii.gz", "fixed_mask": "atlas/mask.nii.gz",
        "moving_mask": "subjects/s1/mask.nii.gz", "fixed_seg": "atlas/seg.nii.gz", "moving_seg": "",
    }
    assert pair_row({"image": "/a.nii"}, {"image": "/b.nii", "seg": None})["moving_seg"] == ""
    with pytest.raises(ValueError, match="moving subject has no image"):
        pair_row(atlas, {"image": None})


def _subject(folder: Path, seg: bool = True) -> None:
    shape = (12, 14, 10)
    g = np.random.default_rng(len(folder.name))
    img = g.uniform(0, 1, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    save_nifti(folder / UKBB_IMAGE, img, np.eye(4))
    save_nifti(folder / UKBB_MASK, mask, np.eye(4))
    labels = np.zeros(shape, np.int16)
    labels[4:7, 4:8, 3:6] = 10
    save_nifti(folder / UKBB_SEG, labels, np.eye(4))


def test_ukbb_builder_reports_k_of_n_and_writes_the_same_rows(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for sid in ("a0", "s1", "s2", "s3"):
        _subject(root / sid)
    lines: list[str] = []
    out = tmp_path / "out"
    build_ukbb(root, "a0", ["s1", "s2"], out, test_ids=["s3"], dims=8, log=lines.append)
    steps = [ln for ln in lines if re.match(r"\[learnsim-data\] \d/4 \(", ln)]
    assert [s.split()[1] for s in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("left)" in s for s in steps[:-1]) and "done)" in steps[-1]
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1] == {
        "fixed": "atlas/image.nii.gz", "moving": "subjects/s2/image.nii.gz", "fixed_mask": "atlas/mask.nii.gz",
        "moving_mask": "subjects/s2/mask.nii.gz", "fixed_seg": "atlas/seg.nii.gz", "moving_seg": "subjects/s2/seg.nii.gz",
    }
    # a rerun: every subject up to date, still counted
    lines.clear()
    build_ukbb(root, "a0", ["s1", "s2"], out, test_ids=["s3"], dims=8, log=lines.append)
    assert sum("up to date" in ln and "/4 (" in ln for ln in lines) == 4
    # the linked layout uses the same row constructor, with absolute paths
    build_ukbb(root, "a0", ["s1"], tmp_path / "linked", dims=8, link_originals=True, log=lines.append)
    with open(tmp_path / "linked" / "train.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["fixed"] == str((root / "a0" / UKBB_IMAGE).resolve())
    assert row["moving_seg"] == str((root / "s1" / UKBB_SEG).resolve())
