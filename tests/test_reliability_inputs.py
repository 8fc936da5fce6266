"""Issue 15: nothing lost (--overwrite), every bad input refused with one message naming the file and the field."""

from __future__ import annotations

import pickle
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob

from learnsim import api
from learnsim.cli import register as register_cli
from learnsim.data.validate import DataValidationError, PairRecord, validate_pairs

SHAPE = (12, 14, 10)


_blob = partial(blob, shape=SHAPE, centre=(6, 7, 5), scale=3.0)  # the shared phantom (conftest)


def _save(path: Path, arr: np.ndarray, aff=None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]) if aff is None else aff), path)
    return path


@pytest.fixture()
def pair(tmp_path):
    return {"fixed": str(_save(tmp_path / "fixed.nii.gz", _blob())),
            "moving": str(_save(tmp_path / "moving.nii.gz", _blob(centre=(7, 6, 5))))}


def _cli(pair, out, *extra):
    return register_cli.main([pair["fixed"], pair["moving"], "--out", str(out), "--no-figures", "no_iters=2", "no_samples=2",
                              *extra])


# ---------------------------------------------------------------------------------------------- 1: --overwrite
def test_overwrite_never_replaces_a_folder_learnsim_did_not_write(pair, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="not a learnsim-register output"):
        _cli(pair, out, "--overwrite")
    assert (out / "thesis.tex").read_text() == "precious"
    # a previous learnsim output is replaced, and carries the marker again; not while it holds a file learnsim
    # did not write (issue 29: refused, naming the file)
    out2 = tmp_path / "reg"
    _cli(pair, out2)
    (out2 / "stale.txt").write_text("from the first run")
    with pytest.raises(SystemExit, match=r"did not write \(stale.txt\)"):
        _cli(pair, out2, "--overwrite")
    assert (out2 / "stale.txt").read_text() == "from the first run"
    (out2 / "stale.txt").unlink()
    _cli(pair, out2, "--overwrite")
    assert (out2 / register_cli.MARKER).is_file() and (out2 / "warped.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("where", [".", "..", "/", "home"])
def test_overwrite_refuses_cwd_parents_root_and_home(pair, tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    for d in (work, tmp_path / "a"):
        (d / register_cli.MARKER).write_text("")  # even a folder that looks like an output
        (d / "keep.txt").write_text("x")
    out = str(tmp_path / "a") if where == "home" else where

    def must_not_run(*a, **k):  # the check comes first; never let a registration reach the replace step here
        raise AssertionError("registration started although --out must be refused")

    monkeypatch.setattr(register_cli, "register", must_not_run)
    with pytest.raises(SystemExit, match="refusing to replace"):
        _cli(pair, out, "--overwrite")
    assert (work / "keep.txt").is_file() and (tmp_path / "a" / "keep.txt").is_file()


# ---------------------------------------------------------------------------------------------- 4, 9: pair lists
def _csv(tmp_path: Path, rows: list[str]) -> Path:
    p = tmp_path / "pairs.csv"
    p.write_text("fixed,moving\n" + "\n".join(rows) + "\n")
    return p


def test_two_fixed_images_are_refused_but_a_byte_identical_copy_is_not(tmp_path):
    _save(tmp_path / "atlas.nii.gz", _blob())
    _save(tmp_path / "other_atlas.nii.gz", _blob(centre=(5, 5, 5)))
    (tmp_path / "atlas_copy.nii.gz").write_bytes((tmp_path / "atlas.nii.gz").read_bytes())
    for s in ("s1", "s2", "s3"):
        _save(tmp_path / f"{s}.nii.gz", _blob(centre=(6, 6, 6)) + 0.1 * int(s[1]))
    with pytest.raises(DataValidationError) as err:
        validate_pairs(_csv(tmp_path, ["atlas.nii.gz,s1.nii.gz", "other_atlas.nii.gz,s2.nii.gz"]))
    assert "row 1" in str(err.value) and "'fixed'" in str(err.value) and "other_atlas.nii.gz" in str(err.value)
    assert len(validate_pairs(_csv(tmp_path, ["atlas.nii.gz,s1.nii.gz", "atlas_copy.nii.gz,s2.nii.gz"]))) == 2


def test_duplicated_row_is_refused_and_pair_ids_keep_subject_names(tmp_path):
    _save(tmp_path / "atlas.nii.gz", _blob())
    for s in ("1001", "1002"):
        (tmp_path / s).mkdir()
        _save(tmp_path / s / "t1.nii.gz", _blob(centre=(6, 6, 6)) + 0.1 * int(s[-1]))
    with pytest.raises(DataValidationError, match=r"row 2 \(line 4\).*duplicates row 0"):
        validate_pairs(_csv(tmp_path, ["atlas.nii.gz,1001/t1.nii.gz", "atlas.nii.gz,1002/t1.nii.gz",
                                       "atlas.nii.gz,./1001/t1.nii.gz"]))
    from learnsim.data.dataset import pair_ids, pair_key

    recs = [PairRecord(i, tmp_path / "atlas.nii.gz", m) for i, m in
            enumerate([tmp_path / "1001/t1.nii.gz", tmp_path / "1002/t1.nii.gz", tmp_path / "x/1001/t1.nii.gz"])]
    ids = pair_ids(recs)
    assert len(set(ids)) == 3 and ids[1] == "1002" and all(s in i for s, i in zip(["1001", "1002", "1001"], ids, strict=True))
    # the pair key is the identity of the files, not of the row: re-ordered rows keep it
    assert pair_key(recs[0], tmp_path) == pair_key(PairRecord(7, recs[0].fixed, recs[0].moving), tmp_path)
    assert pair_key(recs[0], tmp_path) != pair_key(recs[1], tmp_path)


# ---------------------------------------------------------------------------------------------- 5: empty inputs
def test_all_zero_images_and_empty_mask_are_refused(pair, tmp_path):
    zero = str(_save(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.float32)))
    empty_mask = str(_save(tmp_path / "empty_mask.nii.gz", np.zeros(SHAPE, np.uint8)))
    for fixed, moving in ((zero, pair["moving"]), (pair["fixed"], zero)):
        with pytest.raises(SystemExit, match=r"zero\.nii\.gz: image is all zero"):
            register_cli.main([fixed, moving, "--out", str(tmp_path / "out"), "no_iters=2"])
    with pytest.raises(SystemExit, match=r"empty_mask\.nii\.gz: the fixed mask is empty"):
        register_cli.main([pair["fixed"], pair["moving"], "--fixed-mask", empty_mask, "--out", str(tmp_path / "out"),
                           "no_iters=2"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="moving: image is all zero"):
        api.register(torch.rand(*SHAPE), torch.zeros(*SHAPE), no_iters=2, device="cpu")
    with pytest.raises(ValueError, match="fixed mask is empty"):
        api.register(torch.rand(*SHAPE), torch.rand(*SHAPE), fixed_mask=torch.zeros(*SHAPE), no_iters=2, device="cpu")
    # and a pair list (learnsim-test with histmatch crashed on it after pair 0)
    p = tmp_path / "pairs.csv"
    p.write_text(f"fixed,moving\n{pair['fixed']},{pair['moving']}\n{pair['fixed']},{zero}\n")
    with pytest.raises(DataValidationError, match=r"row 1 \(line 3\), column 'moving', file .*zero\.nii\.gz: image is all zero"):
        validate_pairs(p)


# ---------------------------------------------------------------------------------------------- 6: orientation
@pytest.mark.parametrize("kind", ["lps", "permuted"])
def test_outputs_keep_an_lps_or_permuted_fixed_images_grid(tmp_path, kind):
    """The same volumes stored RAS and stored LPS/permuted give the same result, on each one's own grid."""
    ras_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed, moving = _blob(), _blob(centre=(7, 6, 5))
    if kind == "lps":
        to = lambda a: a[::-1, ::-1, :].copy()  # noqa: E731
        back_vec = torch.tensor([-1.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)
        aff = ras_aff @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        perm = [0, 1, 2]
    else:
        to = lambda a: a.transpose(1, 2, 0).copy()  # noqa: E731  stored axes: (y, z, x)
        back_vec = torch.ones(1, 3, 1, 1, 1)
        aff = ras_aff[:, [1, 2, 0, 3]]
        perm = [1, 2, 0]
    outs = {}
    for name, f, m, a in (("ras", fixed, moving, ras_aff), (kind, to(fixed), to(moving), aff)):
        fp, mp = _save(tmp_path / f"f_{name}.nii.gz", f, a), _save(tmp_path / f"m_{name}.nii.gz", m, a)
        outs[name] = api.register(fp, mp, "ssd", no_iters=20, lr=0.05, no_steps=4, no_samples=2, data_weight=100.0,
                                  histmatch=False,  # orientation is under test; histogram matching amplifies the
                                  # reorientation's float rounding on these flat blobs
                                  device="cpu")
    ras, other = outs["ras"], outs[kind]
    assert np.allclose(other.affine, aff) and tuple(other.warped.shape[2:]) == to(fixed).shape
    np.testing.assert_allclose(other.warped[0, 0].numpy(), to(ras.warped[0, 0].numpy()), atol=1e-4)
    for c in range(3):  # mm displacements are world vectors: only the voxels move
        np.testing.assert_allclose(other.disp_mm[0, c].numpy(), to(ras.disp_mm[0, c].numpy()), atol=1e-4)
    # voxel displacements: the components follow the stored axes (and flips)
    ras_vox = torch.stack([torch.from_numpy(to(ras.disp[0, c].numpy())) for c in perm])[None] * back_vec
    torch.testing.assert_close(other.disp, ras_vox, atol=1e-4, rtol=0)
    assert ras.disp.abs().max() > 0.05


# ---------------------------------------------------------------------------------------------- 7: settings
def test_out_of_range_and_mistyped_settings_are_refused(pair, tmp_path):
    with pytest.raises(SystemExit, match=r"no_iters must be an integer in \[1, 1000000\] or null; got -5"):
        register_cli.main([pair["fixed"], pair["moving"], "--out", str(tmp_path / "o"), "no_iters=-5"])
    with pytest.raises(SystemExit, match="bad value for 'histmatch': 'ture'"):
        register_cli.main([pair["fixed"], pair["moving"], "--out", str(tmp_path / "o"), "histmatch=ture"])
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0, 10000\]"):
        api.register(torch.rand(*SHAPE), torch.rand(*SHAPE), lr=-1.0, device="cpu")
    from test_module import make_module

    with pytest.raises(ValueError, match="q_v.no_iters must be an integer >= 1; got -5"):
        make_module(no_iters=-5)
    from omegaconf import OmegaConf

    from learnsim.cli.test import _check_settings

    good = {"save_nifti": True, "figures": True, "amp": False, "q_v": {"no_iters": 4}, "no_samples": 2,
            "no_samples_uncertainty": 2, "max_pairs": None, "split": "test"}
    _check_settings(OmegaConf.create(good))
    with pytest.raises(ValueError, match="save_nifti must be true or false; got 'ture'"):
        _check_settings(OmegaConf.create({**good, "save_nifti": "ture"}))
    with pytest.raises(ValueError, match="q_v.no_iters must be an integer >= 1"):
        _check_settings(OmegaConf.create({**good, "q_v": {"no_iters": -5}}))


# ---------------------------------------------------------------------------------------------- 8: checkpoints
class _Evil:
    def __reduce__(self):
        return (Path.write_text, (Path(_Evil.target), "code ran"))

    target = ""


def test_foreign_checkpoints_are_refused_without_running_their_code(pair, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    _Evil.target = str(tmp_path / "pwned")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, evil)
    plain = tmp_path / "plain.ckpt"
    with open(plain, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Evil()}, f)
    for path in (text, evil, plain):
        with pytest.raises(ValueError, match=rf"{path.name}: not a learnsim checkpoint"):
            api.load_metric(path)
        with pytest.raises(SystemExit, match=rf"learnsim-register: --metric .*{path.name}: not a learnsim checkpoint"):
            register_cli.main([pair["fixed"], pair["moving"], "--out", str(tmp_path / "o"), "--metric", str(path)])
    assert not (tmp_path / "pwned").exists(), "code from the checkpoint file ran"
    no_metric = tmp_path / "no_metric.ckpt"
    torch.save({"state_dict": {}}, no_metric)
    with pytest.raises(ValueError, match="no_metric.ckpt: not a learnsim checkpoint"):
        api.load_metric(no_metric)


# ---------------------------------------------------------------------------------------------- 10: CLIs
def _fake_ckpt(path: Path) -> Path:
    from learnsim.metric import build_metric

    metric = build_metric("ssd")
    torch.save({"state_dict": {f"metric.{k}": v for k, v in metric.state_dict().items()},
                "hyper_parameters": {"metric_spec": dict(metric.spec), "dims": [12, 14, 10]},
                "learnsim_config": {"data": {"intensity": "histmatch"}, "transformation": {"no_steps": 5}}}, path)
    return path


def test_register_takes_the_checkpoints_settings_and_ctrl_c_is_clean(pair, tmp_path, monkeypatch, capsys):
    seen = {}

    def interrupted(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(register_cli, "register", interrupted)
    ckpt = _fake_ckpt(tmp_path / "learnt.ckpt")
    with pytest.raises(SystemExit) as err:
        register_cli.main([pair["fixed"], pair["moving"], "--out", str(tmp_path / "o"), "--metric", str(ckpt)])
    assert err.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert seen["histmatch"] is True and seen["no_steps"] == 5
    with pytest.raises(SystemExit):
        register_cli.main([pair["fixed"], pair["moving"], "--out", str(tmp_path / "o"), "--metric", str(ckpt),
                           "no_steps=7", "histmatch=false"])
    assert seen["histmatch"] is False and seen["no_steps"] == 7, "what is given on the command line wins"
    assert not (tmp_path / "o").exists()


def _hydra_cli(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as err:
        module.main()
    return err.value


def test_hydra_cli_bad_input_is_one_message_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from learnsim.cli import test as test_cli

    monkeypatch.delenv("LEARNSIM_DEBUG", raising=False)
    argv = ["learnsim-test", "metric=ssd", "logger=none", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}/nodata"]
    err = _hydra_cli(test_cli, argv, monkeypatch)
    assert "learnsim-test:" in str(err.code) and "test.csv" in str(err.code)
    assert "Traceback" not in capsys.readouterr().err
    runs = tmp_path / "runs" / "test" / "eval"
    assert not runs.exists() or not list(runs.iterdir()), "a failed attempt must not leave a run folder"

    def interrupted(cfg, out_dir=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(test_cli, "evaluate", interrupted)
    err = _hydra_cli(test_cli, argv, monkeypatch)
    assert err.code == 130 and "learnsim-test: interrupted" in capsys.readouterr().err
    assert not runs.exists() or not list(runs.iterdir())


def test_run_folder_with_results_is_kept(tmp_path):
    from learnsim.cli.config import remove_empty_run_dir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("")
    (run / "train.log").write_text("")
    (run / "checkpoints").mkdir()
    assert not remove_empty_run_dir(run) and run.is_dir()
    (run / "checkpoints").rmdir()
    assert remove_empty_run_dir(run) and not run.exists()


def test_data_cli_ctrl_c(monkeypatch, capsys, tmp_path):
    from learnsim.cli import data as data_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("learnsim.data.validate.validate_pairs", interrupted)
    assert data_cli.main(["validate", str(tmp_path / "x.csv")]) == 130
    assert "interrupted" in capsys.readouterr().err
