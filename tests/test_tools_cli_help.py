"""learnsim-train / learnsim-test --help: experiments, config groups with options, common keys; wandb set-up."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from learnsim.cli import test as test_cli
from learnsim.cli import train as train_cli
from learnsim.cli.config import config_dir
from learnsim.cli.logger import is_wandb, prepare_wandb

CONF = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _page(module, prog: str, monkeypatch, capsys, flag: str = "--help") -> str:
    monkeypatch.setattr(sys, "argv", [prog, "+experiment=demo", flag])
    module.main()  # returns instead of starting a run
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("module", "prog", "keys"),
    [
        (train_cli, "learnsim-train",
         ["paths.data_dir", "data.dims", "trainer.max_epochs", "q_v.no_iters", "metric", "ckpt_path"]),
        (test_cli, "learnsim-test",
         ["ckpt", "metric", "paths.data_dir", "data.dims", "q_v.no_iters", "no_samples"]),
    ],
)
def test_help_lists_experiments_groups_and_keys(module, prog, keys, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    page = _page(module, prog, monkeypatch, capsys)
    assert len(EXPERIMENTS) >= 10
    experiments = page.split("Experiments")[1].split("Config groups")[0]
    for name in EXPERIMENTS:
        assert f"\n  {name} " in experiments or f"\n  {name}\n" in experiments, name
    groups = page.split("Config groups")[1].split("Keys you will change")[0]
    for group in ("data", "metric", "trainer", "logger", "transformation"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        line = next(ln for ln in groups.splitlines() if ln.strip().startswith(group + " "))
        for option in options:
            assert option in line, (group, option)
    default_metric = {"learnsim-train": "cnn_lcc, cnn_ssd*, cnn_ssd_t, lcc, ssd, ssd_t",
                      "learnsim-test": "cnn_lcc, cnn_ssd, cnn_ssd_t, lcc, ssd*, ssd_t"}
    assert f"  metric          {default_metric[prog]}\n" in groups  # the default option is marked
    key_part = page.split("Keys you will change")[1]
    for key in keys:
        assert f"\n  {key} " in key_part, key
    assert "[[64, 64, 64]]" in key_part  # current defaults come from the composed config
    assert "Powered by Hydra" not in page and "== Config ==" not in page  # not Hydra's generic page
    assert list(tmp_path.iterdir()) == []  # no run folder: --help starts nothing
    assert _page(module, prog, monkeypatch, capsys, "-h") == page


def test_help_is_built_from_the_config_folder(tmp_path, monkeypatch, capsys) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "my_study.yaml").write_text(
        "# @package _global_\n# My study: SSD on 96^3. More words here.\ndefaults:\n  - ssd\n"
    )
    (conf / "metric" / "my_metric.yaml").write_text((CONF / "metric" / "ssd.yaml").read_text())
    monkeypatch.setenv("LEARNSIM_CONF", str(conf))
    page = _page(train_cli, "learnsim-train", monkeypatch, capsys)
    # the name column is as wide as the longest experiment name
    assert re.search(r"^  my_study +My study: SSD on 96\^3\.$", page, re.MULTILINE), page
    assert "my_metric" in next(ln for ln in page.splitlines() if ln.startswith("  metric "))


def test_help_from_the_console_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "learnsim.cli.test", "--help"], capture_output=True, text=True,
                         check=True, timeout=120)
    assert all(name in out.stdout for name in EXPERIMENTS) and "learnsim-compare" in out.stdout


def test_prepare_wandb_is_offline_and_silent_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    cfg = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "x"}
    assert is_wandb(cfg) and not is_wandb({"_target_": "lightning.pytorch.loggers.CSVLogger"}) and not is_wandb(None)
    assert prepare_wandb(cfg) == "offline"
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_SILENT"] == "true"
    monkeypatch.delenv("WANDB_MODE")
    assert prepare_wandb({**cfg, "offline": False}) == "online" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    prepare_wandb(cfg)
    assert os.environ["WANDB_MODE"] == "disabled"
