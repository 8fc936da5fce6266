"""Pair-list validation: every bad input is reported, all at once, naming row, column and file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learnsim.cli.data import main as cli_main
from learnsim.data.validate import DataValidationError, validate_pairs
from learnsim.io import save_nifti

SHAPE = (12, 14, 10)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
HEADER = "fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg"


def _img(path: Path, data=None, affine=AFF) -> str:
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    save_nifti(path, rng.random(SHAPE).astype(np.float32) if data is None else data, affine)
    return path.name


def _mask(path: Path) -> str:
    m = np.zeros(SHAPE, np.uint8)
    m[2:10, 2:12, 2:8] = 1
    return _img(path, m)


def _seg(path: Path, ids=(10, 49)) -> str:
    s = np.zeros(SHAPE, np.int16)
    for k, i in enumerate(ids):
        s[2 + 2 * k : 4 + 2 * k, 3:6, 3:6] = i
    return _img(path, s)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    names = [
        _img(tmp_path / "atlas.nii.gz"),
        _img(tmp_path / "s1.nii.gz"),
        _mask(tmp_path / "atlas_mask.nii.gz"),
        _mask(tmp_path / "s1_mask.nii.gz"),
        _seg(tmp_path / "atlas_seg.nii.gz"),
        _seg(tmp_path / "s1_seg.nii.gz"),
    ]
    (tmp_path / "pairs.csv").write_text(HEADER + "\n" + ",".join(names) + "\n")
    return tmp_path / "pairs.csv"


def _write(tmp_path: Path, rows: list[str], header: str | None = HEADER) -> Path:
    p = tmp_path / "bad.csv"
    p.write_text("\n".join(([header] if header else []) + rows) + "\n")
    return p


def _problems(csv: Path, **kw) -> list[str]:
    with pytest.raises(DataValidationError) as err:
        validate_pairs(csv, **kw)
    assert isinstance(err.value, ValueError)
    return err.value.problems


def test_good_pair_list(good: Path):
    recs = validate_pairs(good, required_labels=[10, 49])
    assert len(recs) == 1 and recs[0].index == 0 and recs[0].has_seg
    assert recs[0].moving == good.parent / "s1.nii.gz"


def test_optional_columns_may_be_absent_or_empty(good: Path, tmp_path: Path):
    p = _write(tmp_path, ["atlas.nii.gz,s1.nii.gz"], header="fixed,moving")
    assert validate_pairs(p)[0].fixed_mask is None
    p = _write(tmp_path, ["atlas.nii.gz,s1.nii.gz,,,atlas_seg.nii.gz,"])
    rec = validate_pairs(p)[0]
    assert rec.fixed_seg is not None and rec.moving_seg is None and not rec.has_seg


def test_missing_header(good: Path, tmp_path: Path):
    p = _write(tmp_path, ["atlas.nii.gz,s1.nii.gz"], header=None)
    (msg,) = [m for m in _problems(p) if "header" in m]
    assert "missing column" in msg and "fixed" in msg and "header missing" in msg


def test_missing_column(good: Path, tmp_path: Path):
    p = _write(tmp_path, ["atlas.nii.gz"], header="fixed")
    assert any("missing column" in m and "'moving'" in m for m in _problems(p))


def test_missing_file_and_empty_required_cell(good: Path, tmp_path: Path):
    p = _write(tmp_path, ["atlas.nii.gz,nope.nii.gz,,,,", ",s1.nii.gz,,,,"])
    probs = _problems(p)
    assert any("row 0" in m and "'moving'" in m and "nope.nii.gz" in m and "not found" in m for m in probs)
    assert any("row 1" in m and "'fixed'" in m and "empty" in m for m in probs)


def test_not_3d(good: Path, tmp_path: Path):
    _img(tmp_path / "four_d.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    p = _write(tmp_path, ["atlas.nii.gz,four_d.nii.gz,,,,"])
    (msg,) = _problems(p)
    assert "row 0" in msg and "'moving'" in msg and "four_d.nii.gz" in msg and "not a 3D" in msg


def test_nan_and_inf(good: Path, tmp_path: Path):
    x = np.ones(SHAPE, np.float32)
    x[1, 2, 3], x[4, 5, 6] = np.nan, np.inf
    _img(tmp_path / "nan.nii.gz", x)
    p = _write(tmp_path, ["atlas.nii.gz,nan.nii.gz,,,,"])
    (msg,) = _problems(p)
    assert "'moving'" in msg and "nan.nii.gz" in msg and "2 NaN/inf" in msg


def test_unreadable_file(good: Path, tmp_path: Path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    (msg,) = _problems(_write(tmp_path, ["atlas.nii.gz,junk.nii.gz,,,,"]))
    assert "junk.nii.gz" in msg and "cannot be read" in msg


def test_grids_disagree(good: Path, tmp_path: Path):
    m = np.ones((12, 14, 11), np.uint8)
    _img(tmp_path / "wrong_shape_mask.nii.gz", m)
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    s = np.zeros(SHAPE, np.int16)
    s[3:6, 3:6, 3:6] = 10
    _img(tmp_path / "shifted_seg.nii.gz", s, shifted)
    p = _write(tmp_path, ["atlas.nii.gz,s1.nii.gz,,wrong_shape_mask.nii.gz,,shifted_seg.nii.gz"])
    probs = _problems(p)
    assert any(
        "'moving_mask'" in m and "wrong_shape_mask.nii.gz" in m and "disagrees" in m and "(12, 14, 11)" in m
        for m in probs
    )
    assert any("'moving_seg'" in m and "shifted_seg.nii.gz" in m and "disagrees" in m for m in probs)


def test_label_map_empty_and_missing_structures(good: Path, tmp_path: Path):
    _img(tmp_path / "empty_seg.nii.gz", np.zeros(SHAPE, np.int16))
    _seg(tmp_path / "partial_seg.nii.gz", ids=(10,))
    _img(tmp_path / "s2.nii.gz")  # a second subject: the same pair twice is refused (test_reliability_inputs)
    p = _write(
        tmp_path,
        [
            "atlas.nii.gz,s1.nii.gz,,,atlas_seg.nii.gz,empty_seg.nii.gz",
            "atlas.nii.gz,s2.nii.gz,,,atlas_seg.nii.gz,partial_seg.nii.gz",
        ],
    )
    probs = _problems(p, required_labels=[10, 49])
    assert any(
        "row 0" in m and "'moving_seg'" in m and "empty_seg.nii.gz" in m and "empty" in m for m in probs
    )
    assert any(
        "row 1" in m and "'moving_seg'" in m and "partial_seg.nii.gz" in m and "[49]" in m for m in probs
    )
    assert len(probs) == 2  # the atlas seg has both structures


def test_all_problems_reported_at_once(good: Path, tmp_path: Path, capsys):
    _img(tmp_path / "four_d.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    x = np.ones(SHAPE, np.float32)
    x[0, 0, 0] = np.nan
    _img(tmp_path / "nan.nii.gz", x)
    p = _write(
        tmp_path,
        ["atlas.nii.gz,missing.nii.gz,,,,", "atlas.nii.gz,four_d.nii.gz,,,,", "atlas.nii.gz,nan.nii.gz,,,,"],
    )
    probs = _problems(p)
    assert len(probs) == 3 and [m.split(",")[0] for m in probs] == [
        "row 0 (line 2)",
        "row 1 (line 3)",
        "row 2 (line 4)",
    ]
    # the CLI prints them all and exits 1
    assert cli_main(["validate", str(p)]) == 1
    err = capsys.readouterr().err
    assert (
        "3 problem(s)" in err and "missing.nii.gz" in err and "four_d.nii.gz" in err and "nan.nii.gz" in err
    )
    assert cli_main(["validate", str(good), "--structures", "10", "49"]) == 0


def test_missing_csv_and_empty_csv(tmp_path: Path):
    assert any("not found" in m for m in _problems(tmp_path / "none.csv"))
    (tmp_path / "empty.csv").write_text("")
    assert any("empty" in m for m in _problems(tmp_path / "empty.csv"))
    (tmp_path / "header_only.csv").write_text(HEADER + "\n")
    assert any("no rows" in m for m in _problems(tmp_path / "header_only.csv"))
