"""Entry points: every experiment composes, bad input stops with one clear error, nothing half-written."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from learnsim.cli import register as register_cli
from learnsim.cli.config import config_dir
from learnsim.defaults import PAPER
from learnsim.energies import EnergyKind
from learnsim.registration import VariationalRegistration

CONF = config_dir()
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("config", ["train", "test"])
def test_every_experiment_composes(experiment, config):
    overrides = [f"+experiment={experiment}"]
    if experiment.startswith("vxm_learnt"):
        overrides.append("metric_ckpt=/nonexistent.ckpt")
    cfg = _compose(config, overrides)
    assert cfg.metric._target_ == "learnsim.metric.SimilarityMetric"
    if config == "train" and not experiment.startswith("vxm_learnt"):
        # the registration components instantiate (the model may need data/checkpoints, built elsewhere)
        for group in ("metric", "reg_loss", "transformation", "sobolev"):
            instantiate(cfg[group])


def test_paper_settings_are_the_defaults():
    ssd = _compose("train", ["+experiment=ssd"])
    lcc = _compose("train", ["+experiment=lcc"])
    for cfg, energy in ((ssd, EnergyKind.SSD), (lcc, EnergyKind.LCC)):  # the configs state learnsim.defaults.PAPER
        p = PAPER[energy]
        assert (cfg.reg_loss.w_reg, cfg.q_v.lr, cfg.q_v.no_iters) == (p.w_reg, p.lr, p.no_iters)
        assert (cfg.transformation.no_steps, cfg.sobolev.s, cfg.sobolev.lam) == (p.no_steps, p.sobolev_s, p.sobolev_lambda)
        assert (cfg.q_v.sigma_init, cfg.q_v.u_init, cfg.q_v.rank, cfg.uniform_noise) == (
            p.sigma_init, p.u_init, p.rank, p.uniform_noise)
        built = instantiate(cfg.registration)(metric=instantiate(cfg.metric))  # the one builder, from config
        paper = VariationalRegistration.paper(instantiate(cfg.metric))  # the one table
        for key in ("no_iters", "lr", "sigma_init", "u_init", "rank", "uniform_noise"):
            assert getattr(built, key) == getattr(paper, key), key
        assert built.reg.w_reg == paper.reg.w_reg and built.transformation.no_steps == paper.transformation.no_steps
    assert "lr" not in ssd.optimizer.q_v  # q_v's learning rate has one spelling: q_v.lr
    assert ssd.metric.no_features == [4, 8, 8] and ssd.transformation.no_steps == 12
    assert (ssd.q_v.sigma_init, ssd.q_v.u_init, ssd.q_f.sigma_init, ssd.q_f.u_init) == (0.5, 0.1, 0.1, 0.1)
    assert (ssd.optimizer.q_f.lr, ssd.optimizer.q_phi.lr) == (1e-3, 1e-5)
    assert ssd.sobolev.s == 3 and ssd.sobolev.lam == 0.5 and ssd.uniform_noise == 0.1
    assert ssd.data.batch_size == 5 and list(ssd.data.dims) == [128, 128, 128] and ssd.trainer.max_epochs == 50
    assert ssd.logger.offline is True
    assert ssd.metric.energy.weight == 1.0 and lcc.metric.energy.weight == 1.0 and ssd.data.intensity == "minmax"
    demo = _compose("train", ["+experiment=demo"])
    assert demo.metric.energy.weight == 100.0 and demo.data.intensity == "histmatch"
    assert _compose("train", ["+experiment=demo_lcc"]).metric.energy.weight == 10.0
    vxm = _compose("train", ["+experiment=vxm_ssd", "metric.energy.weight=100"])  # as scripts/demo_vxm.sh
    assert instantiate(vxm.metric).energy.weight == 100.0
    assert _compose("train", ["+experiment=ssd", "logger=wandb_online"]).logger.offline is False


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        _compose("train", ["+experiment=ssd", "q_v.no_such_key=3"])
    with pytest.raises(ConfigCompositionException, match="nosuchgroup|no_such"):
        _compose("train", ["metric=no_such_metric"])


# ---------------------------------------------------------------------------------------------- learnsim-register


_blob = partial(blob, scale=4.0)  # the shared phantom (conftest)


@pytest.fixture()
def pair(tmp_path):
    shape = (20, 24, 28)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = _blob(shape, (10, 12, 14))
    moving = _blob(shape, (11, 11, 15))
    seg = (moving > 0.5).astype(np.int16) * 17
    paths = {}
    for name, arr in (("fixed", fixed), ("moving", moving), ("seg", seg)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), paths[name])
    return paths


def test_register_cli_writes_outputs_with_fixed_affine(pair, tmp_path):
    out = tmp_path / "out"
    register_cli.main([str(pair["fixed"]), str(pair["moving"]), "--out", str(out), "--seg", str(pair["seg"]),
                       "no_iters=40", "lr=0.05", "no_steps=6", "no_samples=3"])
    fixed_img = nib.load(pair["fixed"])
    for name in ("warped", "warped_seg", "disp_mm", "uncertainty_mm"):
        img = nib.load(out / f"{name}.nii.gz")
        assert np.allclose(img.affine, fixed_img.affine)
        assert img.shape[:3] == fixed_img.shape
    assert nib.load(out / "disp_mm.nii.gz").shape == (*fixed_img.shape, 3)
    assert set(np.unique(nib.load(out / "warped_seg.nii.gz").get_fdata())) <= {0.0, 17.0}
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _write(path: Path, arr, aff=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if aff is None else aff), path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("2d", "3D"),
        ("nan", "NaN"),
        ("seg_shape", "moving_seg grid"),
        ("unknown_key", "unknown config key 'no_such_key'"),
    ],
)
def test_register_bad_input_stops_with_one_clear_error(pair, tmp_path, case, expected):
    fixed, moving, seg = str(pair["fixed"]), str(pair["moving"]), str(pair["seg"])
    extra: list[str] = ["no_iters=2"]
    if case == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    elif case == "2d":
        moving = str(_write(tmp_path / "flat.nii.gz", np.zeros((20, 24), np.float32)))
    elif case == "nan":
        arr = _blob((20, 24, 28), (10, 12, 14))
        arr[3, 3, 3] = np.nan
        moving = str(_write(tmp_path / "nan.nii.gz", arr, np.diag([2.0, 2.0, 2.0, 1.0])))
    elif case == "seg_shape":
        seg = str(_write(tmp_path / "badseg.nii.gz", np.ones((10, 12, 14), np.int16), np.diag([2.0, 2.0, 2.0, 1.0])))
    elif case == "unknown_key":
        extra.append("no_such_key=1")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        register_cli.main([fixed, moving, "--out", str(out), "--seg", seg, *extra])
    msg = str(err.value)
    assert expected in msg
    if case in ("missing", "2d", "nan"):
        assert Path(moving).name in msg, "the error must name the file"
    if case == "seg_shape":
        assert "badseg.nii.gz" in msg
    assert not out.exists(), "no partial outputs"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_register_api_on_tensors_recovers_shift():
    from learnsim import api

    shape = (20, 24, 28)
    fixed = torch.from_numpy(_blob(shape, (10, 12, 14)))
    moving = torch.from_numpy(_blob(shape, (11.0, 12, 13)))
    out = api.register(fixed, moving, "ssd", no_iters=150, lr=0.05, no_steps=6, no_samples=4, sigma_init=0.05,
                       w_reg=0.5, device="cpu")
    assert out.samples.shape == (4, 1, 3, *shape) and out.uncertainty_mm.shape == (1, 1, *shape)
    centre = out.disp[0, :, 8:13, 10:15, 12:17].mean(dim=(1, 2, 3))
    assert torch.allclose(centre, torch.tensor([1.0, 0.0, -1.0]), atol=0.3), centre


def test_register_likelihood_precision_and_histmatch():
    """The paper's SSD precision (1) barely moves q_v's mean at sigma_init 0.5 / w_reg 1.8; precision 100 recovers
    the shift. Histogram matching makes a contrast-changed moving image register like the original."""
    from learnsim import api
    from learnsim.metric import build_metric

    shape = (20, 24, 28)
    fixed = torch.from_numpy(_blob(shape, (10, 12, 14)))
    moving = torch.from_numpy(_blob(shape, (11.0, 12, 14)))
    target = torch.tensor([1.0, 0.0, 0.0])
    metric = build_metric("ssd")
    errs = {}
    for weight in (1.0, 100.0):
        out = api.register(fixed, moving, metric, no_iters=80, lr=0.05, no_steps=6, no_samples=0, data_weight=weight,
                           device="cpu")
        errs[weight] = (out.disp[0, :, 8:13, 10:15, 12:17].mean(dim=(1, 2, 3)) - target).abs().max().item()
    assert errs[100.0] < 0.3 < errs[1.0], errs
    assert metric.energy.weight == 1.0 and metric.spec.get("weight", 1.0) == 1.0, "the caller's metric is unchanged"
    out = api.register(fixed, moving**2, metric, no_iters=80, lr=0.05, no_steps=6, no_samples=0, data_weight=100.0,
                       histmatch=True, device="cpu")
    assert "moving histogram matched to the fixed image's" in out.notes
    err = (out.disp[0, :, 8:13, 10:15, 12:17].mean(dim=(1, 2, 3)) - target).abs().max().item()
    assert err < 0.3, err
    with pytest.raises(ValueError, match=r"data_weight must be a finite number in \(0"):
        api.register(fixed, moving, metric, no_iters=1, data_weight=0.0, device="cpu")


def test_evaluation_compares_dims_given_as_one_int_with_training():
    """``data.dims=16`` (one int) next to a training run's ``[16, 16, 16]`` (or ``48`` against ``[48, 48, 48]``) is the
    same grid: no note, no crash; a different grid is named."""
    from omegaconf import OmegaConf

    from learnsim.cli.test import _compare_with_training

    cfg = OmegaConf.create({"data": {"dims": 16}, "reg_loss": {"w_reg": 1.8}, "transformation": {"no_steps": 12}})
    assert _compare_with_training(cfg, {"data": {"dims": [16, 16, 16]}}) == []
    assert _compare_with_training(cfg, {"data": {"dims": 16}}) == []
    notes = _compare_with_training(cfg, {"data": {"dims": [32, 32, 32]}})
    assert len(notes) == 1 and "data.dims" in notes[0]
