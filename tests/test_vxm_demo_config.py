"""The CPU-demo VoxelMorph experiments (vxm_demo_*) and VoxelMorphNet's int_downsize."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from learnsim.cli.config import config_dir
from learnsim.fast_integration import integrate_fast
from learnsim.spatial import integrate_svf
from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet, cosine_factor, upsample_strided


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "experiment, kind, weight, w_reg, radius",
    [("vxm_demo_ssd", "ssd", 100.0, 1.8, None), ("vxm_demo_lcc", "lcc", 10.0, 2.8, 4)],
)
def test_demo_experiments(experiment, kind, weight, w_reg, radius):
    cfg = _compose([f"+experiment={experiment}"])
    assert cfg.data.on_the_fly and list(cfg.data.dims) == [64, 64, 64] and cfg.data.items_per_epoch > 0
    ckpt = cfg.callbacks.model_checkpoint
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k, ckpt.filename) == ("val/dsc", "max", 1, "best")
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_time is not None
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.gradient_clip_algorithm == "norm"
    module = instantiate(_compose([f"+experiment={experiment}", "data.dims=[32,32,32]"]).model)
    assert isinstance(module, VoxelMorphModule) and module.metric.spec["kind"] == kind
    assert module.metric.energy.weight == weight and module.reg_loss.w_reg == w_reg
    assert radius is None or module.metric.energy.radius == radius
    assert cfg.data.atlas_fraction == 0.9
    assert module.net.res_level == 2 and module.net.int_downsize == 4 and module.net.no_steps == 7
    # rebuilt from a checkpoint with the same resolution and integration
    assert module.hparams["net"]["int_downsize"] == 4 and module.hparams["net"]["res_level"] == 2


@pytest.mark.parametrize("experiment", ["vxm_demo_learnt_ssd", "vxm_demo_learnt_lcc"])
def test_learnt_demo_experiment_needs_a_checkpoint(experiment):
    with pytest.raises(Exception, match="metric_ckpt"):
        instantiate(_compose([f"+experiment={experiment}", "data.dims=[32,32,32]"]).model)


def test_int_downsize_integrates_on_the_coarse_grid():
    torch.manual_seed(0)
    net = VoxelMorphNet((4, 4), (4, 4), half_res=True, no_steps=5, int_downsize=2)
    v = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3), size=(16, 16, 16), mode="trilinear", align_corners=True) * 2
    assert torch.allclose(net.integrate(v), integrate_fast(v, 5, 2))
    # close to, not equal to, the full-resolution integration of a smooth field
    full = integrate_svf(v, 5)
    err = (net.integrate(v) - full).abs()
    assert err.max() > 0 and err.mean() < 0.1 * full.abs().mean()
    with pytest.raises(ValueError, match="int_downsize"):
        VoxelMorphNet(int_downsize=0)


def test_res_level_generalises_half_res():
    torch.manual_seed(0)
    half = VoxelMorphNet((4, 8, 8), (8, 8, 8, 4), half_res=True, no_steps=3)
    r1 = VoxelMorphNet((4, 8, 8), (8, 8, 8, 4), res_level=1, no_steps=3)
    r1.load_state_dict(half.state_dict())  # same layers
    with torch.no_grad():
        for p in half.flow.parameters():
            p.normal_(0, 0.1)
        r1.load_state_dict(half.state_dict())
    m, f = torch.rand(2, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(half.velocity(m, f), r1.velocity(m, f))
    r2 = VoxelMorphNet((4, 8, 8), (8, 8, 8, 4), res_level=2, no_steps=3)
    with torch.no_grad():
        r2.flow.bias.copy_(torch.tensor([0.25, -0.5, 0.0]))  # a constant coarse velocity
        r2.flow.weight.zero_()
    v = r2.velocity(m, f)
    assert v.shape == (2, 3, 16, 16, 16)
    # voxel units: 0.25 / -0.5 quarter-resolution voxels are 1 / -2 full-resolution voxels
    assert torch.allclose(v[:, 0], torch.tensor(1.0)) and torch.allclose(v[:, 1], torch.tensor(-2.0))
    with pytest.raises(ValueError, match="res_level"):
        VoxelMorphNet((4, 8, 8), (8, 8, 8), res_level=3)


def test_cosine_factor_is_a_half_cosine_from_one_to_final():
    assert cosine_factor(0, 100, 0.05) == pytest.approx(1.0)
    assert cosine_factor(50, 100, 0.05) == pytest.approx(0.525)  # halfway: (1 + final) / 2
    assert cosine_factor(100, 100, 0.05) == pytest.approx(0.05)
    assert cosine_factor(250, 100, 0.05) == pytest.approx(0.05)  # held after the budget
    steps = [cosine_factor(k, 100, 0.0) for k in range(101)]
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))


def _tiny_batches(n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 16, 16, 16, generator=g)
    batches = [{"fixed": fixed, "moving": torch.rand(1, 1, 16, 16, 16, generator=g)} for _ in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)  # items are whole batches


def test_cosine_schedule_decays_the_learning_rate_over_max_steps():
    import lightning.pytorch as pl

    net = VoxelMorphNet((4, 4), (4, 4, 4), half_res=True, no_steps=3)
    module = VoxelMorphModule(net, dims=(16, 16, 16), lr=1e-3, lr_schedule="cosine", lr_final=0.1)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=_tiny_batches(8))
    assert trainer.global_step == 6
    # after 6 of 6 steps the rate is lr * lr_final
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert module.hparams["lr_schedule"] == "cosine"


def test_cosine_schedule_needs_a_step_budget_and_a_known_name():
    with pytest.raises(ValueError, match="lr_schedule"):
        VoxelMorphModule(VoxelMorphNet((4, 4), (4, 4, 4)), dims=(16, 16, 16), lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_final"):
        VoxelMorphModule(VoxelMorphNet((4, 4), (4, 4, 4)), dims=(16, 16, 16), lr_final=2.0)


def test_upsample_strided_reads_node_j_at_voxel_factor_j():
    # a field linear in the position of the node it was computed at (node j at fine voxel 4 j) comes back linear
    # in the fine voxel's position: exact up to the last node, replicated beyond it
    j = torch.arange(16, dtype=torch.float64)
    coarse = (4 * j).view(1, 1, 16, 1, 1).expand(1, 1, 16, 2, 3)
    fine = upsample_strided(coarse, 4, (64, 8, 12))
    x = torch.arange(64, dtype=torch.float64)
    assert fine.shape == (1, 1, 64, 8, 12)
    assert torch.allclose(fine[0, 0, :, 0, 0], x.clamp(max=60))
    # the align_corners=True resize stretches the coarse grid: 3 voxels off at the end, 1.5 in the middle
    stretched = torch.nn.functional.interpolate(coarse, size=(64, 8, 12), mode="trilinear", align_corners=True)
    assert (stretched[0, 0, :, 0, 0] - x.clamp(max=60)).abs()[32] > 1.4
    with pytest.raises(ValueError, match="stride"):
        upsample_strided(coarse, 4, (68, 8, 12))


def test_velocity_lands_where_the_features_were_computed():
    # a feature at the moving image's voxel x must drive the velocity at x: a bright spot's response peaks on it
    torch.manual_seed(0)
    net = VoxelMorphNet((4, 4, 4), (4, 4, 4), res_level=2, no_steps=0)
    with torch.no_grad():
        for conv in [*net.encoder, *net.up_convs]:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, 0, 1, 1, 1] = 1.0  # pass channel 0 (the moving image) through, centre tap only
        net.flow.weight.zero_()
        net.flow.weight[:, 0, 1, 1, 1] = 1.0
    m = torch.zeros(1, 1, 64, 8, 8)
    m[0, 0, 56] = 1.0  # on the stride-4 lattice: node 14
    v = net.velocity(m, torch.zeros_like(m))[0, 0, :, 0, 0]
    # full response at voxel 56 (the decoder's nearest up-sampling also spreads it over the next coarse cell);
    # the align_corners resize would read node 13.3 there and reach a third of it
    assert v[56] == v.max() > 0 and v[:53].abs().max() == 0


@pytest.mark.parametrize("experiment", ["vxm_demo_ssd", "demo"])
def test_last_ckpt_is_the_end_of_training_not_the_best(experiment, tmp_path):
    """The best-DSC experiments keep best.ckpt and a last.ckpt of the final epoch (Lightning's own save_last writes
    last.ckpt only in epochs that improve the best); learnsim-train reports the final one."""
    import lightning.pytorch as pl

    from learnsim.cli.train import last_checkpoint

    cfg = _compose([f"+experiment={experiment}", f"paths.output_dir={tmp_path}"])
    callbacks = [instantiate(c) for name, c in cfg.callbacks.items() if name != "progress_bar"]

    class Falling(pl.LightningModule):  # val/dsc 0.9, 0.8, 0.7: epoch 0 stays the best
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1.0).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/dsc", 0.9 - 0.1 * self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(Falling(), train_dataloaders=data, val_dataloaders=data)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "best.ckpt", weights_only=False)["epoch"] == 0
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 2
    assert last_checkpoint(trainer) == str(ckpts / "last.ckpt")
