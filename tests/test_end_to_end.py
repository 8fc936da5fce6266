"""End to end on a tiny phantom cohort: ``cli.train.train(cfg)``, ``cli.test.evaluate(cfg)`` and the Python entry
point ``learnsim.evaluate``; ``data.dims`` given as one int reaches both LightningModules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

import learnsim
from learnsim.checkpoint import ModuleKind, checkpoint_module, load_checkpoint
from learnsim.metric import SimilarityMetric
from learnsim.registration import VariationalRegistration


def test_train_end_to_end(cfg_train):
    from learnsim.cli.train import train

    res = train(cfg_train)
    ckpt = Path(res["ckpt"])
    assert ckpt.is_file()
    state = load_checkpoint(ckpt)
    assert checkpoint_module(state) is ModuleKind.LEARNSIM and state["hyper_parameters"]["dims"] == [16, 16, 16]
    assert {"train/q_v_loss", "train/q_phi_loss", "val/q_v_loss", "val/dsc"} <= set(res["metrics"])
    assert all(v == v for v in res["metrics"].values())  # no NaN
    metric = SimilarityMetric.from_checkpoint(ckpt)
    assert metric.name == "cnn_ssd" and metric.energy.weight == 100.0  # the demo's precision travels with it


def test_evaluate_cli_end_to_end(cfg_test, tmp_path: Path):
    from learnsim.cli.test import evaluate

    out = tmp_path / "run"
    summary = evaluate(cfg_test, out)
    assert summary["n_pairs"] == 1 and summary["overall"]["dsc"]["n"] > 0
    per_pair = pd.read_csv(out / "per_pair.csv")
    assert per_pair["n_samples"].tolist() == [3] and per_pair["n_metric_samples"].tolist() == [2]
    assert json.loads((out / "config.json").read_text())["metric"]["learnable"] is False


def test_python_evaluate_matches_the_cli(cfg_test, tmp_path: Path):
    """learnsim.evaluate with the config's registration gives the CLI's numbers (the CLI only builds and wraps)."""
    from learnsim.cli.test import evaluate as cli_evaluate

    cli = cli_evaluate(cfg_test, tmp_path / "cli")
    torch.manual_seed(cfg_test.seed)
    registration = instantiate(cfg_test.registration)(metric=instantiate(cfg_test.metric))
    assert isinstance(registration, VariationalRegistration) and registration.no_iters == 3
    dm = instantiate(cfg_test.data)
    dm.setup("test")
    py = learnsim.evaluate(registration, dm.test_dataloader(), tmp_path / "py", no_samples=2, no_samples_uncertainty=3,
                           save_nifti=False, figures=False, run_name="eval", echo=None)
    assert py["overall"]["dsc"] == cli["overall"]["dsc"] and py["folding_voxels"] == cli["folding_voxels"]


@pytest.mark.parametrize("dims", [16, [16, 16, 16], (16, 16, 16)])
def test_dims_as_one_int_in_both_modules(dims):
    from learnsim.metric import build_metric
    from learnsim.module import LearnSimModule
    from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

    metric = build_metric("cnn_ssd", no_features=[2])
    module = LearnSimModule(metric, VariationalRegistration.paper(metric, no_iters=2), dims=dims)
    assert module.dims == (16, 16, 16) and tuple(module.q_f.loc.shape[2:]) == (16, 16, 16)
    vxm = VoxelMorphModule(VoxelMorphNet(enc_features=[4, 4], dec_features=[4, 4]), dims=dims)
    assert vxm.dims == (16, 16, 16)


def test_data_dims_48_composes_into_the_models(cfg_train):
    """data.dims=48 (one int) is accepted by the DataModule and by the model built from the same config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg_train, {"data": {"dims": 48}})
    assert instantiate(cfg.data).dims == (48, 48, 48)
    assert instantiate(cfg.model).dims == (48, 48, 48)
