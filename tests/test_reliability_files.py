"""Issue 29: data loss and file safety (output folders, cohort folders, run folders, checkpoints, resume)."""

from __future__ import annotations

import errno
import os
import signal
import stat
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob

from learnsim.cli import register as register_cli

SHAPE = (12, 14, 10)
_blob = partial(blob, shape=SHAPE, centre=(6, 7, 5), scale=3.0)


def _save(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


@pytest.fixture()
def pair(tmp_path):
    return {"fixed": str(_save(tmp_path / "fixed.nii.gz", _blob())),
            "moving": str(_save(tmp_path / "moving.nii.gz", _blob(centre=(7, 6, 5))))}


def _cli(pair, out, *extra):
    return register_cli.main([pair["fixed"], pair["moving"], "--out", str(out), "--no-figures", "no_iters=2",
                              "no_samples=2", *extra])


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".learnsim-output")


# ---------------------------------------------------------------------------------------------- 2: same --out twice
def test_second_register_run_into_the_same_out_does_not_delete_the_first(pair, tmp_path, monkeypatch):
    """Two runs with the same --out, neither with --overwrite: the one finishing second refuses, the first's result
    stays (simulated: the other run publishes while this one is fitting)."""
    out = tmp_path / "reg"
    real = register_cli.register
    calls = []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # while this run fits, another one with the same --out finishes
            assert _cli(pair, out) == 0
            (out / "registration.json").write_text('{"run": "first"}')
        return real(*args, **kwargs)

    monkeypatch.setattr(register_cli, "register", racing)
    with pytest.raises(SystemExit, match="not replacing it without --overwrite"):
        _cli(pair, out)
    assert (out / "registration.json").read_text() == '{"run": "first"}', "the first run's result was replaced"
    assert _hidden(tmp_path) == [], "the staging folder stays behind"


# ---------------------------------------------------------------------------------------------- 3: user files
def test_overwrite_refuses_a_folder_holding_the_users_files_and_lists_them(pair, tmp_path):
    out = tmp_path / "reg"
    assert _cli(pair, out) == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "figs").mkdir()
    (out / "figs" / "a.png").write_bytes(b"png")
    with pytest.raises(SystemExit, match=r"did not write \(figs, figs/a.png, my_notes.txt\)"):
        _cli(pair, out, "--overwrite")
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "figs" / "a.png").is_file()
    (out / "my_notes.txt").unlink()
    (out / "figs" / "a.png").unlink()
    (out / "figs").rmdir()
    assert _cli(pair, out, "--overwrite") == 0  # a folder holding only what learnsim wrote is replaced
    assert (out / "warped.nii.gz").is_file() and _hidden(tmp_path) == []


def test_overwrite_accepts_an_older_outputs_marker(pair, tmp_path):
    out = tmp_path / "reg"
    assert _cli(pair, out) == 0
    (out / register_cli.MARKER).write_text("written by learnsim-register; --overwrite may replace this folder\n")
    assert _cli(pair, out, "--overwrite") == 0
    (out / register_cli.MARKER).write_text("written by learnsim-register; --overwrite may replace this folder\n")
    (out / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit, match="thesis.tex"):
        _cli(pair, out, "--overwrite")


# ---------------------------------------------------------------------------------------------- 17/18: register
def test_register_output_folder_gets_the_usual_permissions(pair, tmp_path):
    old = os.umask(0o022)
    try:
        assert _cli(pair, tmp_path / "reg") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "reg").stat().st_mode) == 0o755, "mkdtemp's 0700 reached the output folder"


def test_sigterm_while_writing_leaves_no_partial_folder(pair, tmp_path, monkeypatch, capsys):
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(register_cli, "summary_line", killed)  # runs after the NIfTI files are staged
    with pytest.raises(SystemExit) as err:
        _cli(pair, tmp_path / "reg")
    assert err.value.code == 143 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists() and _hidden(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_disk_full_is_one_line_and_leaves_nothing(pair, tmp_path, monkeypatch):
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(register_cli, "save_nifti", full)
    with pytest.raises(SystemExit, match=r"^learnsim-register: No space left on device writing .*warped.nii.gz"):
        _cli(pair, tmp_path / "reg")
    assert not (tmp_path / "reg").exists() and _hidden(tmp_path) == []
