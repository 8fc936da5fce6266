"""VoxelMorph with a baseline or a frozen learnt metric (docs/method.md#voxelmorph): network, training, checkpoints, configs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from learnsim.api import load_metric
from learnsim.cli.config import config_dir
from learnsim.distributed import ManualSyncDDPStrategy, RankShardSampler
from learnsim.energies import RegLossL2
from learnsim.evaluation.metrics import mean_dice
from learnsim.metric import build_metric
from learnsim.spatial import gaussian_smooth, identity_grid, warp, warp_labels
from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

SMALL = {"enc_features": [4, 8], "dec_features": [8, 8, 8], "no_steps": 5}  # grid sizes: multiples of 4
SHAPE = (16, 12, 8)  # non-cubic on purpose


def _pair_data(shape=SHAPE, b: int = 2, seed: int = 0, amp: float = 2.0) -> dict:
    """A two-level ball phantom as the atlas and smooth random deformations of it (up to ``amp`` voxels) as the
    moving images, with label maps (1: outer shell, 2: core) and masks; one batch in the DataModule's format."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(shape, dtype=torch.float32).view(1, 3, 1, 1, 1)
    r = ((identity_grid(shape) - (size - 1) / 2) / (size / 2)).norm(dim=1, keepdim=True)
    fixed_seg = (r < 0.6).long() + (r < 0.3).long()
    fixed = gaussian_smooth(fixed_seg.float(), 0.7)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    disp = gaussian_smooth(torch.randn(b, 3, *shape, generator=g), 2.5)
    disp = amp * disp / disp.abs().amax()
    atlas = fixed.expand(b, -1, -1, -1, -1)
    return {
        "fixed": atlas.clone(),
        "moving": warp(atlas, disp),
        "fixed_mask": torch.ones(b, 1, *shape),
        "moving_mask": torch.ones(b, 1, *shape),
        "fixed_seg": fixed_seg.expand(b, -1, -1, -1, -1).clone(),
        "moving_seg": warp_labels(fixed_seg.expand(b, -1, -1, -1, -1), disp),
        "has_seg": torch.ones(b, dtype=torch.bool),
        "index": torch.arange(b),
        "pair_id": [f"p{i}" for i in range(b)],
        "affine": torch.eye(4).expand(b, 4, 4).clone(),
    }


class _Pairs(Dataset):
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return self.batch["moving"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


def _loader(batch: dict) -> DataLoader:
    return DataLoader(_Pairs(batch), batch_size=batch["moving"].shape[0], shuffle=False)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        inference_mode=False,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def _module(metric="ssd", shape=SHAPE, w_reg: float = 0.1, **kw) -> VoxelMorphModule:
    # a weak regulariser: on these tiny phantoms registration must clearly pay off for the loss tests
    return VoxelMorphModule(
        VoxelMorphNet(**SMALL), metric=build_metric(metric), reg_loss=RegLossL2(w_reg), dims=shape, **kw
    )


def _fake_metric_ckpt(path: Path, kind: str = "cnn_ssd", seed: int = 0) -> Path:
    """A learnsim-style checkpoint: hyper_parameters.metric_spec and ``metric.``-prefixed weights (perturbed)."""
    torch.manual_seed(seed)
    metric = build_metric(kind)
    with torch.no_grad():
        for p in metric.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(
        {
            "hyper_parameters": {"metric_spec": metric.spec},
            "state_dict": {f"metric.{k}": v for k, v in metric.state_dict().items()},
        },
        path,
    )
    return path


# ---------------------------------------------------------------------------------------------------- network


def test_untrained_net_outputs_near_identity():
    torch.manual_seed(0)
    net = VoxelMorphNet()  # the default widths, 4 levels: grid sizes are multiples of 16
    batch = _pair_data((32, 48, 16))
    v, disp = net(batch["moving"], batch["fixed"][:1])
    assert v.shape == disp.shape == (2, 3, 32, 48, 16)
    assert v.abs().max() < 1e-2 and disp.abs().max() < 1e-2
    assert torch.allclose(warp(batch["moving"], disp), batch["moving"], atol=1e-3)


def test_half_res_predicts_a_full_resolution_field():
    torch.manual_seed(0)
    net = VoxelMorphNet(**SMALL, half_res=True)
    batch = _pair_data()
    with torch.no_grad():
        net.flow.weight.normal_(0.0, 1e-2)  # a visible field, to see the up-sampling
        v, disp = net(batch["moving"], batch["fixed"])
    assert v.shape == disp.shape == (2, 3, *SHAPE)
    assert v.abs().max() > 1e-3
    # the half-res layer sees half the grid
    seen = {}
    net.flow.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape[2:])))
    net(batch["moving"], batch["fixed"])
    assert seen["shape"] == tuple(s // 2 for s in SHAPE)


def test_bad_grid_size_is_a_clear_error():
    net = VoxelMorphNet(**SMALL)
    x = torch.zeros(1, 1, 16, 10, 8)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*len\(enc_features\) = 4.*\(16, 10, 8\)"):
        net(x, x)
    with pytest.raises(ValueError, match="divisible by"):
        _module(shape=(16, 16, 18))
    with pytest.raises(ValueError, match="at least len"):
        VoxelMorphNet(enc_features=[4, 8, 8], dec_features=[8, 8])


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("metric", ["ssd", "lcc"])
def test_training_steps_lower_the_loss(tmp_path, metric):
    torch.manual_seed(0)
    module = _module(metric, lr=1e-3)
    batch = _pair_data()
    with torch.no_grad():
        before = module._step(batch)[0].item()
    pl.seed_everything(0)
    _trainer(tmp_path, max_steps=5).fit(module, train_dataloaders=_loader(batch))
    with torch.no_grad():
        after = module._step(batch)[0].item()
    assert math.isfinite(before) and after < before - 0.005 * abs(before)  # well above float noise
    logged = _trainer(tmp_path).validate(module, dataloaders=_loader(batch), verbose=False)[0]
    assert set(logged) >= {"val/loss", "val/dsc"} and 0.0 < logged["val/dsc"] <= 1.0


def test_loss_is_normalised_per_voxel():
    torch.manual_seed(0)
    module = _module()
    batch = _pair_data()
    v, disp = module.net(batch["moving"], batch["fixed"])
    data, reg = module.energies(batch["fixed"], batch["moving"], batch["fixed_mask"], v, disp)
    loss, d, r, _ = module._step(batch)
    n = math.prod(SHAPE)
    assert (
        torch.allclose(loss, (data + reg).mean() / n)
        and torch.allclose(d, data.mean() / n)
        and torch.allclose(r, reg.mean() / n)
    )


def test_frozen_learnt_metric_does_not_change(tmp_path):
    ckpt = _fake_metric_ckpt(tmp_path / "metric.ckpt")
    torch.manual_seed(0)
    module = VoxelMorphModule(
        VoxelMorphNet(**SMALL),
        metric=build_metric("cnn_ssd"),
        metric_ckpt=str(ckpt),
        reg_loss=RegLossL2(1.8),
        lr=1e-3,
        dims=SHAPE,
    )
    reference = load_metric(ckpt)
    for (name, p), q in zip(module.metric.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert not p.requires_grad
    metric_before = {k: v.clone() for k, v in module.metric.state_dict().items()}
    net_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(_pair_data()))
    assert all(torch.equal(v, module.metric.state_dict()[k]) for k, v in metric_before.items())
    assert any(not torch.equal(v, module.net.state_dict()[k]) for k, v in net_before.items())
    in_optimiser = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not in_optimiser & {id(p) for p in module.metric.parameters()}
    assert in_optimiser == {id(p) for p in module.net.parameters()}
    module.train()  # the metric stays in eval mode whatever Lightning does
    assert not module.metric.training and module.net.training
    assert module.hparams["metric_source"] == str(ckpt) and module.hparams["metric_spec"]["kind"] == "cnn_ssd"


def test_fixed_features_are_computed_once(tmp_path):
    ckpt = _fake_metric_ckpt(tmp_path / "metric.ckpt")
    module = VoxelMorphModule(VoxelMorphNet(**SMALL), metric_ckpt=str(ckpt), dims=SHAPE)
    calls = []
    module.metric.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    batch = _pair_data()
    for _ in range(3):
        module._step(batch)
    # first step: the atlas (once, not per pair) and the warped pair; then only the warped pair
    assert calls == [1, 2, 2, 2]
    other = dict(batch, fixed=batch["fixed"] * 0.5)
    module._step(other)
    assert calls[-2:] == [1, 2]  # a different fixed image is not served from the cache


def test_mismatched_learnt_metric_is_refused(tmp_path):
    ckpt = _fake_metric_ckpt(tmp_path / "lcc.ckpt", kind="cnn_lcc")
    with pytest.raises(ValueError, match="cnn_lcc.*vxm_learnt_lcc"):
        VoxelMorphModule(
            VoxelMorphNet(**SMALL), metric=build_metric("cnn_ssd"), metric_ckpt=str(ckpt), dims=SHAPE
        )


def test_lcc_radius_widens_a_learnt_lcc_window(tmp_path):
    """lcc_radius keeps the learnt features and precision, changes only the window; it survives a checkpoint."""
    from learnsim.energies import lcc

    ckpt = _fake_metric_ckpt(tmp_path / "lcc.ckpt", kind="cnn_lcc")
    learnt = load_metric(ckpt)
    module = VoxelMorphModule(VoxelMorphNet(**SMALL), metric_ckpt=str(ckpt), dims=SHAPE, lcc_radius=3)
    assert module.metric.energy.radius == 3 and module.hparams["metric_spec"]["radius"] == 3
    assert learnt.energy.radius == 1 and module.metric.energy.weight == learnt.energy.weight
    assert all(torch.equal(p, q) for p, q in zip(module.metric.parameters(), learnt.parameters(), strict=True))
    batch = _pair_data()
    f, m = batch["fixed"][:1], batch["moving"][:1]
    with torch.no_grad():
        expected = learnt.energy.weight * lcc(learnt.features(f), learnt.features(m), None, 3, None)
        assert torch.allclose(module.data_energy(f, m), expected)
        assert not torch.allclose(module.data_energy(f, m), learnt.energy_from_features(
            learnt.features(f), learnt.features(m), None))
    rebuilt = VoxelMorphModule(module.net.config, metric_spec=module.hparams["metric_spec"], dims=SHAPE)
    assert rebuilt.metric.energy.radius == 3
    with pytest.raises(ValueError, match="lcc_radius is for LCC"):
        VoxelMorphModule(VoxelMorphNet(**SMALL), metric_ckpt=str(_fake_metric_ckpt(tmp_path / "s.ckpt")),
                         dims=SHAPE, lcc_radius=4)
    with pytest.raises(ValueError, match="lcc_radius must be >= 1"):
        VoxelMorphModule(VoxelMorphNet(**SMALL), metric_ckpt=str(ckpt), dims=SHAPE, lcc_radius=0)


def test_mean_dice():
    a = torch.tensor([0, 1, 1, 2, 2, 2])
    assert mean_dice(a, a).item() == 1.0
    b = torch.tensor([0, 1, 0, 2, 2, 0])
    assert math.isclose(mean_dice(b, a).item(), 0.5 * (2 / 3 + 0.8), rel_tol=1e-6)
    assert math.isnan(mean_dice(a, torch.zeros_like(a)).item())


class _SGDVoxelMorph(VoxelMorphModule):
    """SGD instead of Adam: the update is linear in the averaged gradient (Adam's first step is ~lr * sign(g))."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)


class _ShardedPairs(pl.LightningDataModule):
    def __init__(self, batch: dict, batch_size: int) -> None:
        super().__init__()
        self.batch, self.batch_size = batch, batch_size

    def train_dataloader(self) -> DataLoader:
        ds = _Pairs(self.batch)
        sampler = RankShardSampler(len(ds), self.trainer.global_rank, self.trainer.world_size, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def test_ddp_two_processes_match_one_process(tmp_path):
    """learnsim's ManualSyncDDPStrategy leaves the module unwrapped: the module must average the gradients."""
    batch = _pair_data()

    def build() -> VoxelMorphModule:
        torch.manual_seed(0)
        return _SGDVoxelMorph(
            VoxelMorphNet(**SMALL), metric=build_metric("ssd"), reg_loss=RegLossL2(0.1), lr=0.5, dims=SHAPE
        )

    common = dict(max_steps=1, use_distributed_sampler=False, limit_val_batches=0)
    single = build()
    _trainer(tmp_path / "one", **common).fit(single, datamodule=_ShardedPairs(batch, 2))
    multi = build()
    strategy = ManualSyncDDPStrategy(start_method="spawn", process_group_backend="gloo")
    _trainer(tmp_path / "two", devices=2, strategy=strategy, **common).fit(
        multi, datamodule=_ShardedPairs(batch, 1)
    )
    init = build()
    moved = 0.0
    for a, b, c in zip(single.net.parameters(), multi.net.parameters(), init.net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-5, "the network must have moved for the comparison to mean anything"


# ---------------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("metric", ["ssd", "lcc"])
def test_register_batch_shapes_and_instance_optimisation(metric):
    torch.manual_seed(0)
    module = _module(metric)
    batch = _pair_data()
    fixed, moving, mask = batch["fixed"][:1], batch["moving"], batch["fixed_mask"][:1]
    mean, samples, seconds = module.register_batch(fixed, moving, mask)
    assert mean.shape == (2, 3, *SHAPE) and samples.shape == (1, 2, 3, *SHAPE)
    assert torch.equal(samples[0], mean) and seconds > 0 and not mean.requires_grad
    assert module.training  # restored

    with torch.inference_mode():  # e.g. inside Lightning's test loop: refinement still works
        refined, rs, _ = module.register_batch(
            fixed, moving, mask, no_samples=5, instance_optimisation_iters=10
        )
    assert refined.shape == (2, 3, *SHAPE) and rs.shape == (1, 2, 3, *SHAPE)
    assert not torch.allclose(refined, mean)
    with pytest.raises(ValueError, match="no_samples"):
        module.register_batch(fixed, moving, mask, no_samples=0)


def test_instance_optimisation_lowers_the_energy():
    torch.manual_seed(0)
    module = _module()
    batch = _pair_data()
    fixed, moving, mask = batch["fixed"][:1], batch["moving"], batch["fixed_mask"][:1]
    v0 = torch.zeros(2, 3, *SHAPE)
    v1 = module._instance_optimise(fixed, moving, mask, v0, 30, module.instance_lr)
    with torch.no_grad():
        e0 = sum(module.energies(fixed, moving, mask, v0, module.net.integrate(v0)))
        e1 = sum(module.energies(fixed, moving, mask, v1, module.net.integrate(v1)))
    assert torch.all(e1 < 0.8 * e0)


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("learnt", [False, True])
def test_checkpoint_round_trip(tmp_path, learnt):
    torch.manual_seed(0)
    if learnt:
        metric_ckpt = _fake_metric_ckpt(tmp_path / "metric.ckpt", kind="cnn_lcc")
        module = VoxelMorphModule(
            VoxelMorphNet(**SMALL, half_res=True),
            metric_ckpt=str(metric_ckpt),
            reg_loss={"w_reg": 2.8},
            lr=1e-3,
            dims=SHAPE,
        )
    else:
        module = _module("lcc", lr=1e-3)
    module.run_config = {"data": {"dims": list(SHAPE)}}
    batch = _pair_data()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(batch))
    path = tmp_path / "vxm.ckpt"
    trainer.save_checkpoint(path)
    if learnt:
        metric_ckpt.unlink()  # the rebuilt module must not need the metric's original checkpoint
    loaded = VoxelMorphModule.load_from_checkpoint(path, map_location="cpu")
    module.eval()
    loaded.eval()
    with torch.no_grad():
        a = module.register_batch(batch["fixed"], batch["moving"], batch["fixed_mask"])
        b = loaded.register_batch(batch["fixed"], batch["moving"], batch["fixed_mask"])
        assert torch.equal(a[0], b[0])
        assert torch.equal(
            module.data_energy(batch["fixed"], batch["moving"]),
            loaded.data_energy(batch["fixed"], batch["moving"]),
        )
    assert loaded.net.config == module.net.config and loaded.reg_loss.w_reg == module.reg_loss.w_reg
    assert loaded.lr == 1e-3 and loaded.dims == SHAPE and loaded.metric.spec == module.metric.spec
    assert all(not p.requires_grad for p in loaded.metric.parameters())
    raw = torch.load(path, weights_only=False)
    assert raw["learnsim_config"] == {"data": {"dims": list(SHAPE)}}
    assert any(k.startswith("net.") for k in raw["state_dict"])  # how learnsim-test recognises VoxelMorph
    if learnt:
        # the frozen metric can be read back out of a VoxelMorph checkpoint too
        m = load_metric(path)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), module.metric.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------- configs


def _compose(overrides: list[str], name: str = "train"):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("experiment, kind, w_reg", [("vxm_ssd", "ssd", 1.8), ("vxm_lcc", "lcc", 2.8)])
def test_baseline_experiments_instantiate(experiment, kind, w_reg):
    cfg = _compose([f"+experiment={experiment}", "data.dims=[16,16,16]", "transformation.no_steps=4"])
    module = instantiate(cfg.model)
    assert isinstance(module, VoxelMorphModule) and module.metric.spec["kind"] == kind
    assert module.reg_loss.w_reg == w_reg and module.net.no_steps == 4 and module.dims == (16, 16, 16)
    assert (
        module.net.config["enc_features"] == [16, 32, 32, 32]
        and not module.net.half_res
        and module.lr == 1e-4
    )
    # the CPU try-out of the docs: the demo data and CPU trainer override the experiment's choices
    demo = _compose([f"+experiment={experiment}", "data=demo", "data.dims=[48,48,48]", "trainer=cpu"])
    assert (
        demo.trainer.accelerator == "cpu"
        and demo.data.num_workers == 0
        and list(demo.data.dims) == [48, 48, 48]
    )


@pytest.mark.parametrize("experiment, kind", [("vxm_learnt_ssd", "cnn_ssd"), ("vxm_learnt_lcc", "cnn_lcc")])
def test_learnt_experiments_instantiate_from_a_checkpoint(tmp_path, experiment, kind):
    ckpt = _fake_metric_ckpt(tmp_path / "metric.ckpt", kind=kind)
    with pytest.raises(Exception, match="metric_ckpt"):
        instantiate(_compose([f"+experiment={experiment}", "data.dims=[16,16,16]"]).model)
    cfg = _compose([f"+experiment={experiment}", "data.dims=[16,16,16]", f"metric_ckpt={ckpt}"])
    module = instantiate(cfg.model)
    reference = load_metric(ckpt)
    assert module.metric.spec == reference.spec
    assert all(
        torch.equal(p, q) for p, q in zip(module.metric.parameters(), reference.parameters(), strict=True)
    )
    assert module.hparams["metric_source"] == str(ckpt)


def test_learnsim_test_overrides_the_refinement_lr(tmp_path):
    """learnsim-test's ``instance_lr`` replaces the checkpoint's refinement step for that evaluation only; bad values
    are refused naming the key."""
    from omegaconf import OmegaConf

    from learnsim.cli.test import _check_settings, _registration

    torch.manual_seed(0)
    module = _module("ssd", lr=1e-3)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=_loader(_pair_data()))
    path = tmp_path / "vxm.ckpt"
    trainer.save_checkpoint(path)
    base = {"ckpt": str(path), "save_nifti": False, "figures": False, "amp": False, "q_v": {"no_iters": 1},
            "no_samples": 1, "no_samples_uncertainty": 0, "max_pairs": None, "data": {"dims": list(SHAPE)},
            "split": "test"}
    for lr, expected in ((None, module.instance_lr), (0.2, 0.2)):
        cfg = OmegaConf.create({**base, "instance_lr": lr})
        _check_settings(cfg)
        vxm, _ = _registration(cfg, torch.device("cpu"))
        assert isinstance(vxm, VoxelMorphModule) and vxm.instance_lr == expected
    for bad in (0, -0.1, True, "fast"):
        with pytest.raises(ValueError, match="instance_lr"):
            _check_settings(OmegaConf.create({**base, "instance_lr": bad}))
