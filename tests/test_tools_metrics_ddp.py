"""Validation metrics as torchmetrics Metrics: definitions, de-duplication, and 2 processes == 1 process (gloo)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PhantomPairs
from torch.utils.data import DataLoader

from learnsim.distributed import ManualSyncDDPStrategy, RankShardSampler
from learnsim.energies import RegLossL2
from learnsim.evaluation.aggregate import FoldingPercent, MeanASD, MeanDSC, dice_entries
from learnsim.evaluation.metrics import structure_metrics
from learnsim.metric import CNNSSD
from learnsim.module import LearnSimModule
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth, warp_labels
from learnsim.transformation import SVF

SHAPE = (10, 11, 12)
LABELS = [1, 2, 3]


def _pair(i: int) -> dict[str, torch.Tensor]:
    """A fixed segmentation (3 boxes) and a moving one shifted by a pair-specific amount, plus a smooth disp."""
    fixed = torch.zeros(1, 1, *SHAPE, dtype=torch.long)
    fixed[..., 1:5, 1:6, 1:7] = 1
    fixed[..., 5:9, 2:8, 3:9] = 2
    fixed[..., 2:6, 6:10, 7:11] = 3
    moving = torch.roll(fixed, shifts=(i % 2, i, (i * 2) % 3), dims=(2, 3, 4))
    if i == 2:
        moving[moving == 3] = 0  # a structure the moving segmentation lacks: left out, not DSC 0
    g = torch.Generator().manual_seed(i)
    disp = gaussian_smooth(torch.randn(1, 3, *SHAPE, generator=g), 1.0) * (0.5 + 2.0 * i)
    return {"fixed_seg": fixed, "moving_seg": moving, "disp": disp, "index": torch.tensor([i])}


def _update(metrics: dict, i: int) -> None:
    p = _pair(i)
    warped = warp_labels(p["moving_seg"], p["disp"])
    metrics["dsc"].update(warped, p["fixed_seg"], p["moving_seg"], p["index"])
    metrics["asd"].update(warped, p["fixed_seg"], torch.eye(4, dtype=torch.float64)[None], p["moving_seg"], p["index"])
    metrics["fold"].update(p["disp"], p["index"])


def _new_metrics() -> dict:
    return {"dsc": MeanDSC(LABELS), "asd": MeanASD(LABELS), "fold": FoldingPercent()}


def test_dice_entries_match_structure_metrics() -> None:
    p = _pair(1)
    warped = warp_labels(p["moving_seg"], p["disp"])
    got = dice_entries(warped, p["fixed_seg"], LABELS + [7])  # 7: absent from the fixed -> NaN
    ref = structure_metrics(warped, p["fixed_seg"], LABELS + [7], (1.0, 1.0, 1.0), surface=False)
    for k, label in enumerate(LABELS):
        assert got[0, k].item() == pytest.approx(ref[label]["dsc"], abs=1e-6)  # MONAI: float32
    assert math.isnan(got[0, 3].item())
    lost = p["fixed_seg"].clone()
    lost[lost == 2] = 0  # the warp loses structure 2 entirely -> 0, not NaN
    assert dice_entries(lost, p["fixed_seg"], [2])[0, 0].item() == 0.0
    moving = p["moving_seg"].clone()
    moving[moving == 3] = 0  # absent from the moving segmentation -> NaN
    assert math.isnan(dice_entries(warped, p["fixed_seg"], [3], moving)[0, 0].item())


def test_pair_mean_pools_entries_and_counts_each_pair_once() -> None:
    m = MeanDSC(LABELS)
    entries = []
    for i in (0, 1, 2, 1):  # pair 1 twice (a padded shard)
        p = _pair(i)
        warped = warp_labels(p["moving_seg"], p["disp"])
        m.update(warped, p["fixed_seg"], p["moving_seg"], p["index"])
        if i not in [e[0] for e in entries]:
            d = dice_entries(warped, p["fixed_seg"], LABELS, p["moving_seg"])[0]
            entries.append((i, d[torch.isfinite(d)].tolist()))
    flat = [v for _, vals in entries for v in vals]
    assert len(flat) == 8  # pair 2 lacks structure 3
    assert m.compute().item() == pytest.approx(sum(flat) / len(flat), abs=1e-12)
    fold = FoldingPercent()
    disp = torch.zeros(1, 3, *SHAPE)
    disp[0, 0, 4:6] = torch.tensor([3.0, -3.0])[:, None, None]  # a fold along D
    fold.update(disp)
    assert fold.compute().item() > 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(MeanDSC(LABELS).compute().item())


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = _new_metrics()
        # this rank alone (no sync), for the naive mean of per-rank means
        local = {"dsc": MeanDSC(LABELS, sync_on_compute=False), "asd": MeanASD(LABELS), "fold": FoldingPercent()}
        for i in RankShardSampler(3, rank, world, shuffle=False):
            _update(metrics, i)
            _update(local, i)
        result = {k: m.compute().item() for k, m in metrics.items()}
        local_dsc = torch.tensor([local["dsc"].compute().item()], dtype=torch.float64)
        dist.all_reduce(local_dsc)
        result["naive_dsc"] = local_dsc.item() / world  # what averaging per-rank means gives
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_report_the_one_process_numbers(tmp_path: Path) -> None:
    one = _new_metrics()
    for i in range(3):
        _update(one, i)
    expected = {k: m.compute().item() for k, m in one.items()}
    assert 0.1 < expected["dsc"] < 0.99 and expected["asd"] > 0 and expected["fold"] >= 0

    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k in ("dsc", "asd", "fold"):
            assert got[k] == pytest.approx(expected[k], rel=1e-12, abs=1e-12), (rank, k)
        # shards of 2 and 1 (+1 padded repeat) pairs: averaging per-rank means would not give the 1-process DSC
        assert abs(got["naive_dsc"] - expected["dsc"]) > 1e-3


# ------------------------------------------------------------------------------- Lightning validation, 1 vs 2 ranks
DIMS = (10, 12, 12)


class _ValData(pl.LightningDataModule):
    def setup(self, stage: str) -> None:
        # 3 pairs, labels 1 and 2, moving labels warped with each pair
        self.ds = PhantomPairs(3, DIMS, disp_scale=8.0, thresholds=(0.6, 0.4), warp_seg=True)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return DataLoader(self.ds, batch_size=1, sampler=RankShardSampler(3, rank, world, shuffle=False))


class _Recorder(pl.Callback):
    """Writes the epoch's validation metrics (rank 0) where the parent process can read them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({k: float(v) for k, v in trainer.callback_metrics.items()}, self.path)


def _validate(tmp_path: Path, devices: int) -> dict[str, float]:
    torch.manual_seed(0)
    metric = CNNSSD(no_features=(2, 4))
    registration = VariationalRegistration(metric, SVF(4), RegLossL2(1.8), SobolevSmoother(True, 1, 0.5), no_iters=3,
                                           sigma_init=0.5, u_init=0.1)
    module = LearnSimModule(metric, registration, dims=DIMS, state_dir=str(tmp_path / f"state{devices}"),
                            no_iters_val=3, log_period=2)
    out = tmp_path / f"val{devices}.pt"
    kw = {"strategy": ManualSyncDDPStrategy(start_method="spawn", process_group_backend="gloo")} if devices > 1 else {}
    trainer = pl.Trainer(
        default_root_dir=tmp_path / f"run{devices}", accelerator="cpu", devices=devices, logger=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
        enable_checkpointing=False, callbacks=[_Recorder(out)], **kw,
    )
    trainer.validate(module, datamodule=_ValData())
    return torch.load(out)


def test_lightning_validation_two_processes_equals_one(tmp_path: Path) -> None:
    """3 validation pairs on 2 ranks (shards of 2 and 1+1 padded): val/dsc, val/asd_mm, val/folding_pct as on 1."""
    one = _validate(tmp_path, 1)
    two = _validate(tmp_path, 2)
    assert 0.0 < one["val/dsc"] < 1.0 and one["val/asd_mm"] >= 0.0
    for key in ("val/dsc", "val/asd_mm", "val/folding_pct"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
