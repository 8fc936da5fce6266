"""The CPU-demo VoxelMorph experiments (vxm_demo_*) and VoxelMorphNet's int_downsize."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from learnsim.cli.config import config_dir
from learnsim.fast_integration import integrate_fast
from learnsim.spatial import integrate_svf
from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "experiment, kind, weight, w_reg", [("vxm_demo_ssd", "ssd", 100.0, 1.8), ("vxm_demo_lcc", "lcc", 10.0, 2.8)]
)
def test_demo_experiments(experiment, kind, weight, w_reg):
    cfg = _compose([f"+experiment={experiment}"])
    assert cfg.data.on_the_fly and list(cfg.data.dims) == [64, 64, 64] and cfg.data.items_per_epoch > 0
    ckpt = cfg.callbacks.model_checkpoint
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k, ckpt.filename) == ("val/dsc", "max", 1, "best")
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_time is not None
    module = instantiate(_compose([f"+experiment={experiment}", "data.dims=[32,32,32]"]).model)
    assert isinstance(module, VoxelMorphModule) and module.metric.spec["kind"] == kind
    assert module.metric.energy.weight == weight and module.reg_loss.w_reg == w_reg
    assert module.net.res_level == 2 and module.net.int_downsize == 4 and module.net.no_steps == 7
    # rebuilt from a checkpoint with the same resolution and integration
    assert module.hparams["net"]["int_downsize"] == 4 and module.hparams["net"]["res_level"] == 2


def test_learnt_demo_experiment_needs_a_checkpoint():
    with pytest.raises(Exception, match="metric_ckpt"):
        instantiate(_compose(["+experiment=vxm_demo_learnt_ssd", "data.dims=[32,32,32]"]).model)


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
