"""LearnSimModule: one training step, q_v state persistence, DDP on CPU, resume from a checkpoint."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import PhantomPairs
from torch.utils.data import DataLoader

from learnsim.distributed import ManualSyncDDPStrategy, RankShardSampler
from learnsim.distributions import init_q_v
from learnsim.energies import RegLossL2
from learnsim.metric import CNNSSD
from learnsim.module import LearnSimModule
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.state import QVStateStore
from learnsim.transformation import SVF

DIMS = (12, 14, 16)


class PhantomDataModule(pl.LightningDataModule):
    def __init__(self, n: int = 4, batch_size: int = 2) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage: str) -> None:
        self.ds = PhantomPairs(self.n, DIMS)

    def atlas(self) -> torch.Tensor:
        return self.ds.atlas

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return DataLoader(self.ds, batch_size=self.batch_size, sampler=RankShardSampler(self.n, rank, world, shuffle=False))


def make_module(state_dir=None, no_iters: int = 4, uniform_noise: float = 0.1, **kw) -> LearnSimModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer_q_phi", partial(torch.optim.Adam, lr=1e-3))
    metric = CNNSSD(no_features=(2, 4))
    registration = VariationalRegistration(
        metric, SVF(4), RegLossL2(1.8), SobolevSmoother(True, 1, 0.5), no_iters=no_iters, sigma_init=0.5, u_init=0.1,
        uniform_noise=uniform_noise, optimizer=partial(torch.optim.Adam),
    )
    return LearnSimModule(metric, registration, dims=DIMS, state_dir=state_dir, log_period=2, **kw)


def make_trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        inference_mode=False, use_distributed_sampler=False, enable_checkpointing=False,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_one_training_step_updates_metric_and_q_f_not_atlas(tmp_path):
    dm = PhantomDataModule(n=2, batch_size=2)
    model = make_module(tmp_path / "state")
    metric_before = [p.detach().clone() for p in model.metric.parameters()]
    make_trainer(tmp_path, max_steps=1).fit(model, datamodule=dm)
    atlas = dm.ds.atlas
    assert torch.equal(model.q_f.loc, atlas), "the atlas (q_f's mean) must not change"
    assert any(not torch.equal(a, b) for a, b in zip(metric_before, model.metric.parameters(), strict=True))
    assert not torch.allclose(model.q_f.log_var, torch.full_like(model.q_f.log_var, 2 * math.log(0.1)))
    assert not torch.allclose(model.q_f.u, torch.full_like(model.q_f.u, 0.1))
    assert model.q_f.log_var.max() <= 0 and model.q_f.u.abs().max() <= 1
    # each pair's q_v was written and moved away from its initialisation
    for i in range(2):
        saved = torch.load(QVStateStore(tmp_path / "state").path(i, 0), weights_only=True)
        assert saved["loc"].dtype == torch.float16 and saved["loc"].abs().max() > 0


def test_q_v_state_round_trip_is_bit_identical(tmp_path):
    store = QVStateStore(tmp_path, "float16")
    p = init_q_v(3, (3, 5, 6, 7))
    p.loc.normal_()
    p.log_var.normal_()
    p.u.normal_()
    store.save([10, 11, 12], p)
    back, found = store.load([10, 11, 12], init_q_v(3, (3, 5, 6, 7)))
    assert found.all()
    for a, b in zip(p.tensors(), back.tensors(), strict=True):
        assert torch.equal(a.half().float(), b)
    # a second round trip of what was read back is exact, bit for bit
    store.save([10, 11, 12], back)
    again, _ = store.load([10, 11, 12], init_q_v(3, (3, 5, 6, 7)))
    for a, b in zip(back.tensors(), again.tensors(), strict=True):
        assert torch.equal(a, b)
    # missing pairs keep the initialisation; a mismatched shape is an error naming the file
    part, found = store.load([10, 99], init_q_v(2, (3, 5, 6, 7)))
    assert found.tolist() == [True, False] and torch.equal(part.loc[1], torch.zeros(3, 5, 6, 7))
    with pytest.raises(ValueError, match="row00000010"):
        store.load([10], init_q_v(1, (3, 4, 4, 4)))
    store.close()


def test_rank_shard_sampler_keeps_pairs_on_their_rank():
    shards = [set(RankShardSampler(10, r, 3, shuffle=True, seed=1)) for r in range(3)]
    assert set().union(*shards) == set(range(10))
    for epoch in range(3):
        for r in range(3):
            s = RankShardSampler(10, r, 3, shuffle=True, seed=1)
            s.set_epoch(epoch)
            assert set(s) == shards[r] and len(s) == 4


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 CPU processes x 1 pair per step == 1 process x 2 pairs per step (per-pair generators, averaged grads)."""
    # SGD: the update is linear in the averaged gradient (Adam's first step is ~lr * sign(g), which turns float
    # rounding of near-zero gradients into +/- lr differences)
    sgd = dict(optimizer_q_phi=partial(torch.optim.SGD, lr=1e-3), optimizer_q_f=partial(torch.optim.SGD, lr=1e-3))
    pl.seed_everything(0)
    single = make_module(tmp_path / "s1", uniform_noise=0.1, **sgd)
    make_trainer(tmp_path / "one", max_epochs=1).fit(single, datamodule=PhantomDataModule(n=4, batch_size=2))

    pl.seed_everything(0)
    multi = make_module(tmp_path / "s2", uniform_noise=0.1, **sgd)
    trainer = make_trainer(
        tmp_path / "two", max_epochs=1, devices=2,
        strategy=ManualSyncDDPStrategy(start_method="spawn", process_group_backend="gloo"),
    )
    trainer.fit(multi, datamodule=PhantomDataModule(n=4, batch_size=1))
    # spawn copies the trained weights back into the parent's module
    init = make_module(**sgd)
    moved = 0.0
    for a, b, c in zip(single.metric.parameters(), multi.metric.parameters(), init.metric.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-5, "the metric must have been trained for the comparison to mean anything"
    assert torch.allclose(single.q_f.log_var, multi.q_f.log_var, atol=1e-6)
    assert not torch.equal(single.q_f.log_var, init.q_f.log_var)
    for i in range(4):
        s1 = torch.load(next((tmp_path / "s1").glob(f"row{i:08d}.s*.pt")), weights_only=True)
        s2 = torch.load(next((tmp_path / "s2").glob(f"row{i:08d}.s*.pt")), weights_only=True)
        assert torch.allclose(s1["loc"].float(), s2["loc"].float(), atol=2e-3)


def test_resume_continues_from_next_epoch_with_q_v_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    model = make_module()
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1)])
    trainer.fit(model, datamodule=PhantomDataModule(n=2, batch_size=2))
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] == 0 and Path(ck["q_v_state_dir"]).is_dir()
    # the per-batch q_v optimiser is not Lightning's: only q_f's and q_phi's states are in the checkpoint
    assert len(ck["optimizer_states"]) == 2 and ck["learnsim_module"] == "LearnSimModule"
    state_after_epoch0 = torch.load(Path(ck["q_v_state_dir"]) / "row00000000.s0000000000.pt", weights_only=True)["loc"].clone()

    # "kill" the run: a brand-new module and trainer resume from the checkpoint
    resumed = make_module()
    seen_epochs: list[int] = []
    warm: list[float] = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen_epochs.append(trainer.current_epoch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            warm.append(float(trainer.callback_metrics["train/q_v_warm_started_step"]))

    trainer2 = make_trainer(tmp_path, max_epochs=2, callbacks=[Spy()])
    trainer2.fit(resumed, datamodule=PhantomDataModule(n=2, batch_size=2), ckpt_path=last)
    assert seen_epochs == [1], "resumed run must start at the next epoch"
    assert warm == [1.0], "q_v must be warm-started from the stored state after resuming"
    state_after_epoch1 = torch.load(Path(ck["q_v_state_dir"]) / "row00000000.s0000000001.pt", weights_only=True)["loc"]
    assert not torch.equal(state_after_epoch0, state_after_epoch1)
