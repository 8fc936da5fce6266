"""Issue 29: data loss and file safety (output folders, cohort folders, run folders, checkpoints, resume)."""

from __future__ import annotations

import errno
import os
import signal
import stat
from functools import partial
from pathlib import Path

import pytest
import test_reliability_inputs as shared
from conftest import blob

from learnsim.cli import register as register_cli

SHAPE = (12, 14, 10)
_blob = partial(blob, shape=SHAPE, centre=(6, 7, 5), scale=3.0)
_cli, _save = shared._cli, shared._save  # the register CLI on a small pair, and a NIfTI writer
pair = shared.pair  # the fixture: a fixed / moving pair of NIfTI files


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


# ---------------------------------------------------------------------------------------------- 1: cohort folders
def test_demo_refuses_a_folder_that_is_not_a_cohort_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    from learnsim.cli import data as data_cli

    def no_network(*a, **k):
        raise AssertionError("the folder must be refused before anything is fetched")

    monkeypatch.setattr("learnsim.data.demo.fetch", no_network)
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / ".thesis.partial.tex").write_text("chapter 3")
    (home / "train.csv").write_text("my own list")
    assert data_cli.main(["demo", "--dims", "8", "--out", str(home)]) == 1
    err = capsys.readouterr().err
    assert "not a learnsim cohort" in err and "train.csv" in err and "Traceback" not in err
    assert (home / "thesis" / ".thesis.partial.tex").read_text() == "chapter 3"
    assert (home / "train.csv").read_text() == "my own list"


def test_rebuild_removes_only_learnsims_own_partial_files(ukbb_root, tmp_path):
    from learnsim.data.cohort import COHORT_MARKER
    from learnsim.data.ukbb import build_ukbb

    out = tmp_path / "cohort"
    build = partial(build_ukbb, ukbb_root, "1000", ["1001"], out, dims=12, log=lambda *a, **k: None)
    build()
    assert (out / COHORT_MARKER).is_file()
    mine = out / "subjects" / "1001" / ".image.ab12cd_9.partial.nii.gz"  # what a killed build leaves
    mine.write_bytes(b"half a file")
    users = [out / ".thesis.partial.tex", out / "subjects" / ".notes.abcdefgh.partial.txt",
             out / "subjects" / "1001" / ".image.partial.nii.gz"]
    for f in users:
        f.write_text("the user's")
    build()
    assert not mine.exists()
    assert all(f.read_text() == "the user's" for f in users)
    # a folder that is not a cohort is refused; an empty one is taken
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.csv").write_text("mine")
    with pytest.raises(ValueError, match="not a learnsim cohort"):
        build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "other", dims=12, log=lambda *a, **k: None)
    assert (tmp_path / "other" / "train.csv").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "empty", dims=12, log=lambda *a, **k: None)


# ---------------------------------------------------------------------------------------------- 4, 14: resume
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _resume(run: Path, datamodule, max_epochs: int = 2):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_module import make_module, make_trainer

    model = make_module()
    ckpt = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(run, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(model, datamodule=datamodule, ckpt_path=run / "checkpoints" / "last.ckpt")
    model.state.flush()
    return model


def test_resuming_a_copied_run_folder_leaves_the_originals_states_alone(tmp_path):
    import shutil

    from test_module import PhantomDataModule
    from test_reliability_resume import _fit

    _fit(tmp_path / "orig", None, max_epochs=1)
    before = _tree(tmp_path / "orig" / "q_v_state")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    model = _resume(tmp_path / "copy", PhantomDataModule(n=4, batch_size=2))
    assert model.state.root.resolve() == (tmp_path / "copy" / "q_v_state").resolve()
    assert _tree(tmp_path / "orig" / "q_v_state") == before, "the copy wrote into (or pruned) the original's states"


def test_resuming_with_a_replaced_atlas_warns_and_uses_the_new_one(tmp_path):
    import warnings

    import torch
    from test_module import PhantomDataModule
    from test_reliability_resume import _fit

    class NewAtlas(PhantomDataModule):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            self.ds.atlas = 1.0 - self.ds.atlas  # same "path", new content

    _fit(tmp_path / "run", None, max_epochs=1)
    with pytest.warns(RuntimeWarning, match="atlas differs from the one the checkpoint was trained with"):
        model = _resume(tmp_path / "run", NewAtlas(n=4, batch_size=2))
    dm = NewAtlas(n=4, batch_size=2)
    dm.setup("fit")
    assert torch.equal(model.q_f.loc, dm.atlas().to(model.q_f.loc))

    with warnings.catch_warnings():  # the checkpoint now records the new atlas: no warning on the next resume
        warnings.filterwarnings("error", message=".*atlas differs.*")
        _resume(tmp_path / "run", NewAtlas(n=4, batch_size=2), max_epochs=3)


# ---------------------------------------------------------------------------------------------- 5: run folders
def _hydra_main(module, argv, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", argv)
    try:
        module.main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_two_runs_started_in_the_same_second_get_their_own_run_folders(tmp_path, monkeypatch):
    from learnsim.cli import test as test_cli

    def evaluate(cfg, out_dir=None):
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
        (out / "metrics.csv").write_text(f"run {len(list(out.parent.iterdir()))}")
        return {}

    monkeypatch.setattr(test_cli, "evaluate", evaluate)
    # the run folder's time stamp at a resolution of one year: both runs start "in the same second"
    argv = ["learnsim-test", "metric=ssd", "logger=none", f"paths.root_dir={tmp_path}",
            "hydra.run.dir=${paths.log_dir}/${task}/${name}/${now:%Y}"]
    assert _hydra_main(test_cli, argv, monkeypatch) == 0
    assert _hydra_main(test_cli, argv, monkeypatch) == 0
    runs = sorted((tmp_path / "runs" / "test" / "eval").iterdir())
    assert len(runs) == 2 and runs[1].name == runs[0].name + "_1"
    assert [(r / "metrics.csv").read_text() for r in runs] == ["run 1", "run 2"]
    assert all((r / ".hydra" / "config.yaml").is_file() for r in runs)
    # a run folder named on purpose (no time stamp) is used as it is
    fixed = tmp_path / "mine"
    assert _hydra_main(test_cli, [*argv[:-1], f"hydra.run.dir={fixed}"], monkeypatch) == 0
    assert (fixed / "metrics.csv").is_file() and not (tmp_path / "mine_1").exists()


# ---------------------------------------------------------------------------------------------- 6: last.ckpt
def test_checkpoint_write_failing_midway_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    import torch

    from learnsim.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    assert use_atomic_checkpoints(trainer) and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    io = trainer.strategy.checkpoint_io
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, last)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # most of the bytes reach the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(last, weights_only=True)["epoch"] == 1, "the good last.ckpt was damaged"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"], "a temporary file stayed behind"


def test_train_cli_saves_checkpoints_atomically(monkeypatch, tmp_path):
    """learnsim-train's trainer uses AtomicCheckpointIO (fit is stubbed: only the wiring is checked)."""
    from hydra import compose, initialize_config_dir

    import learnsim.cli.train as train_cli
    from learnsim.checkpoint_io import AtomicCheckpointIO
    from learnsim.cli.config import config_dir

    seen = {}

    def fit(self, *args, **kwargs):
        seen["io"] = type(self.strategy.checkpoint_io)

    monkeypatch.setattr(train_cli.pl.Trainer, "fit", fit)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", ["+experiment=demo", "logger=none", f"paths.root_dir={tmp_path}",
                                f"paths.output_dir={tmp_path}/run"])
    train_cli.train(cfg)
    assert seen["io"] is AtomicCheckpointIO


# ---------------------------------------------------------------------------------------------- 17/18: train CLI
@pytest.mark.parametrize("failure", ["ctrl_c", "disk_full", "bug"])
def test_train_cli_failures_exit_cleanly_and_leave_no_run_folder(failure, tmp_path, monkeypatch, capsys):
    import sys

    import learnsim.cli.train as train_cli

    def fit(self, *args, **kwargs):
        if failure == "ctrl_c":  # what Lightning does with a KeyboardInterrupt inside fit
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                sys.exit(1)
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "last.ckpt"))
        raise RuntimeError("an unexpected bug")

    monkeypatch.delenv("LEARNSIM_DEBUG", raising=False)
    monkeypatch.setattr(train_cli.pl.Trainer, "fit", fit)
    argv = ["learnsim-train", "+experiment=demo", "logger=none", f"paths.root_dir={tmp_path}"]
    code = _hydra_main(train_cli, argv, monkeypatch)
    err = capsys.readouterr().err
    if failure == "bug":  # a bug keeps its traceback (Hydra prints it and exits 1)
        assert code == 1 and "an unexpected bug" in err
    elif failure == "ctrl_c":
        assert code == 130 and "learnsim-train: interrupted" in err
    else:
        assert code == "learnsim-train: No space left on device writing " + str(tmp_path / "last.ckpt") + \
            " (free some space or choose another output folder)"
    runs = tmp_path / "runs" / "train"
    assert not [p for p in runs.rglob("*") if p.is_dir() and p.parent.parent == runs], "a run folder stayed"


# ---------------------------------------------------------------------------------------------- 13, 17/18: compare
def _run_folder(folder: Path, pairs: list[str], dsc: float) -> Path:
    import json

    import pandas as pd

    rows = [{"pair": p, "sample": s, "structure": name, "label": label, "dsc": dsc + 0.01 * i, "asd_mm": 1.0,
             "hd95_mm": 3.0}
            for i, p in enumerate(pairs) for label, name in ((10, "L thalamus"), (49, "R thalamus")) for s in range(2)]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame({"pair": pairs, "folding_voxels": 0, "sdlogj": 0.1, "seconds": 1.0}).to_csv(folder / "per_pair.csv",
                                                                                             index=False)
    (folder / "summary.json").write_text(json.dumps({"run": folder.name}))
    return folder


def test_compare_refuses_runs_over_different_pairs(tmp_path, capsys):
    from learnsim.cli.compare import main

    a = _run_folder(tmp_path / "a", ["p0", "p1", "p2"], 0.6)
    b = _run_folder(tmp_path / "b", ["p3", "p4", "p5"], 0.7)
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "different pairs" in err and "lacks 3 pair(s)" in err and "p0" in err
    assert not (tmp_path / "cmp" / "wilcoxon.csv").exists()
    c = _run_folder(tmp_path / "c", ["p0", "p1", "p2"], 0.7)
    assert main([str(a), str(c), "--out", str(tmp_path / "cmp"), "--no-figures"]) == 0


@pytest.mark.parametrize("where", ["file", "root"])
def test_compare_refuses_an_out_that_is_a_file_or_the_root(where, tmp_path, capsys):
    from learnsim.cli.compare import main

    a, b = _run_folder(tmp_path / "a", ["p0", "p1"], 0.6), _run_folder(tmp_path / "b", ["p0", "p1"], 0.7)
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main([str(a), str(b), "--out", str(out) if where == "file" else "/", "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("learnsim-compare: --out") and "Traceback" not in err
    assert out.read_text() == "mine" and not Path("/summary_table.csv").exists()


def test_compare_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    from learnsim.cli import compare as compare_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("learnsim.evaluation.compare.compare_runs", interrupted)
    a, b = _run_folder(tmp_path / "a", ["p0", "p1"], 0.6), _run_folder(tmp_path / "b", ["p0", "p1"], 0.7)
    assert compare_cli.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 130
    assert "learnsim-compare: interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 17/18: pair lists
def test_symlink_loop_in_a_pair_list_is_one_named_problem(pair, tmp_path, capsys):
    from learnsim.cli import data as data_cli
    from learnsim.data.validate import DataValidationError, validate_pairs

    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg\n{pair['fixed']},loop1,,,,\n")
    with pytest.raises(DataValidationError, match="column 'moving', file loop1: a symbolic link loop"):
        validate_pairs(csv)
    assert data_cli.main(["validate", str(csv)]) == 1
    assert "symbolic link loop" in capsys.readouterr().err


def test_train_with_the_wandb_logger_refused_on_its_data_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """wandb writes its offline run into the run folder when Lightning starts: the pair lists are checked first."""
    import learnsim.cli.train as train_cli

    monkeypatch.delenv("LEARNSIM_DEBUG", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    argv = ["learnsim-train", "+experiment=demo", "logger=wandb", f"paths.root_dir={tmp_path}",
            f"paths.data_dir={tmp_path / 'nowhere'}"]
    code = _hydra_main(train_cli, argv, monkeypatch)
    assert isinstance(code, str) and "train.csv" in code
    runs = tmp_path / "runs" / "train"
    assert not [p for p in runs.rglob("*") if p.is_dir() and p.parent.parent == runs], "a run folder stayed"
