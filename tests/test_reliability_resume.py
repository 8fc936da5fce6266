"""Issue 15, cases 2-3: exact resume of a run killed mid-epoch; q_v states keyed by pair identity, tagged by step."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import PhantomDataModule, make_module, make_trainer

from learnsim.distributions import init_q_v
from learnsim.state import QVStateStore

N, BATCH = 4, 2


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    """Raise after batch ``batch`` of epoch ``epoch`` has run (its q_v states are already written)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            pl_module.state.flush()
            raise Killed("simulated kill")


class WarmSpy(pl.Callback):
    def __init__(self) -> None:
        self.warm: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.warm.append(float(trainer.callback_metrics["train/q_v_warm_started_step"]))


def _fit(root: Path, state_dir: Path | None, max_epochs: int, ckpt: Path | None = None, callbacks=(), **kw):
    model = make_module(state_dir, **kw)
    cbs = [ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_epochs=1, save_top_k=-1), *callbacks]
    trainer = make_trainer(root, max_epochs=max_epochs, enable_checkpointing=True, callbacks=cbs)
    trainer.fit(model, datamodule=PhantomDataModule(n=N, batch_size=BATCH), ckpt_path=ckpt)
    model.state.flush()
    return model


def _states(root: Path) -> torch.Tensor:
    store = QVStateStore(root, async_writes=False)
    params, found = store.load(list(range(N)), init_q_v(N, (3, 12, 14, 16)))
    assert found.all()
    return torch.cat([t.flatten(1) for t in params.tensors()], 1)


def test_killed_mid_epoch_resumes_exactly(tmp_path):
    """A run killed in epoch 2 of 2 (after its first batch) and resumed from last.ckpt ends with the same metric
    weights and q_v states as an uninterrupted run: the states the killed epoch wrote are rolled back."""
    ref = _fit(tmp_path / "ref", tmp_path / "ref_state", max_epochs=2)

    with pytest.raises(Killed):
        _fit(tmp_path / "run", tmp_path / "run_state", max_epochs=2, callbacks=[KillAt(epoch=1, batch=0)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    with pytest.warns(RuntimeWarning, match="written after the checkpoint"):
        resumed = _fit(tmp_path / "run", tmp_path / "run_state", max_epochs=2, ckpt=last)

    # the same q_v states, bit for bit (fp16 on disk), and the same weights (float tolerance)
    torch.testing.assert_close(_states(tmp_path / "ref_state"), _states(tmp_path / "run_state"), rtol=0, atol=0)
    for a, b in zip(ref.metric.parameters(), resumed.metric.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ref.q_f.log_var, resumed.q_f.log_var, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(ref.metric.parameters(), make_module().metric.parameters(), strict=True))


def test_states_are_tagged_and_pruned(tmp_path):
    """Each state file names its pair and step; two generations are kept; newer states of another session are
    invisible after set_valid_before, and the one before is used."""
    store = QVStateStore(tmp_path, async_writes=False)
    p = init_q_v(1, (3, 4, 4, 4))
    for step in range(3):
        p.loc.fill_(step)
        store.save(["abc"], p, step=step, epoch=step)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["abc.s0000000001.pt", "abc.s0000000002.pt"]
    saved = torch.load(tmp_path / "abc.s0000000002.pt", weights_only=True)
    assert saved["key"] == "abc" and saved["step"] == 2 and saved["epoch"] == 2
    other = QVStateStore(tmp_path, async_writes=False)  # a new session resuming from a checkpoint at step 2
    assert other.set_valid_before(2) == 1
    back, found = other.load(["abc"], init_q_v(1, (3, 4, 4, 4)))
    assert found.all() and back.loc.max() == 1  # rolled back to step 1
    assert other.set_valid_before(1) == 2
    assert not other.load(["abc"], init_q_v(1, (3, 4, 4, 4)))[1].any()
    with pytest.raises(ValueError, match="letters, digits"):
        store.save(["../evil"], p)


def test_moved_run_folder_finds_its_states(tmp_path):
    """Checkpoints point at their states relative to themselves: a moved run folder still warm-starts."""
    _fit(tmp_path / "old", None, max_epochs=1)
    shutil.move(tmp_path / "old", tmp_path / "moved")
    spy = WarmSpy()
    model = make_module()
    trainer = make_trainer(tmp_path / "new_run", max_epochs=2, callbacks=[spy])
    trainer.fit(model, datamodule=PhantomDataModule(n=N, batch_size=BATCH),
                ckpt_path=tmp_path / "moved" / "checkpoints" / "last.ckpt")
    assert spy.warm == [1.0, 1.0]
    assert model.state.root.resolve() == (tmp_path / "moved" / "q_v_state").resolve()


def test_missing_states_on_resume_warn(tmp_path):
    _fit(tmp_path / "old", None, max_epochs=1)
    shutil.rmtree(tmp_path / "old" / "q_v_state")
    model = make_module()
    trainer = make_trainer(tmp_path / "old", max_epochs=2)
    with pytest.warns(RuntimeWarning) as record:
        trainer.fit(model, datamodule=PhantomDataModule(n=N, batch_size=BATCH),
                    ckpt_path=tmp_path / "old" / "checkpoints" / "last.ckpt")
    text = " ".join(str(w.message) for w in record)
    assert "not found" in text and "no stored q_v state for 4 pair(s)" in text


def test_new_run_into_existing_folder_does_not_warm_start(tmp_path):
    """A fresh run whose state folder holds another run's states ignores them, and says so."""
    _fit(tmp_path / "first", tmp_path / "state", max_epochs=1)
    spy = WarmSpy()
    model = make_module(tmp_path / "state")
    with pytest.warns(RuntimeWarning, match="this run, which starts from scratch"):
        make_trainer(tmp_path / "second", max_epochs=1, callbacks=[spy]).fit(
            model, datamodule=PhantomDataModule(n=N, batch_size=BATCH))
    assert spy.warm == [0.0, 0.0]


def test_checkpoint_loads_with_weights_only(tmp_path):
    _fit(tmp_path / "run", None, max_epochs=1)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["q_v_step"] == N // BATCH and ck["q_v_state_relpath"] == "../q_v_state"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from learnsim.api import load_metric

        load_metric(tmp_path / "run" / "checkpoints" / "last.ckpt")
