"""The README's quick start runs as written, on a tiny cohort: every command of its ``bash`` blocks, in order, from
an empty folder, with only size settings appended (later settings win: argparse and Hydra both take the last one),
so a renamed option, key, experiment or output path in the README fails here. Also: the version lands in the run
folders (``.hydra/config.yaml``, ``summary.json``, ``registration.json``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: appended to each command so that it runs in seconds (16^3 grid, 2 q_v steps per level, one batch, two pairs)
TINY = {
    "learnsim-data demo": ["--dims", "16", "--n-train", "1", "--n-val", "1", "--n-test", "2"],
    "learnsim-data validate": ["--headers-only"],
    "learnsim-train": ["data.dims=[16,16,16]", "q_v.level_iters=[2,2,2]", "trainer.max_epochs=1",
                       "+trainer.limit_train_batches=1", "no_iters_val=2", "logger=csv"],
    "learnsim-test": ["data.dims=[16,16,16]", "q_v.level_iters=[2,2,2]", "max_pairs=2", "no_samples=2",
                      "no_samples_uncertainty=2", "save_nifti=false", "figures=false", "logger=none"],
    "learnsim-register": ["no_samples=2", "level_iters=2,2,2"],
    "learnsim-compare": ["--no-figures"],
}


def quickstart_commands(readme: str) -> list[str]:
    """The shell commands of the bash blocks in the README's "Quick start" section, continuation lines joined."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #", 1)[0].strip()
            if cmd and not cmd.startswith("#"):
                commands.append(cmd)
    return commands


def test_quickstart_commands_are_found() -> None:
    cmds = quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    tools = [" ".join(shlex.split(c)[:2]) if c.startswith("learnsim-data") else shlex.split(c)[0] for c in cmds]
    for tool in ("learnsim-data demo", "learnsim-register", "learnsim-train", "learnsim-test", "learnsim-compare"):
        assert tool in tools, (tool, cmds)
    assert all(t in TINY for t in tools), tools  # every command is one this test knows how to make cheap


@pytest.mark.slow
@pytest.mark.download
def test_quickstart_runs_as_written(tmp_path: Path, learnsim_cache: Path) -> None:
    import yaml

    from learnsim import __version__

    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               LEARNSIM_CACHE=str(learnsim_cache), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("LEARNSIM_ROOT", None)
    for cmd in quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        argv = shlex.split(cmd)
        tool = " ".join(argv[:2]) if argv[0] == "learnsim-data" else argv[0]
        out = subprocess.run(argv + TINY[tool], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    # what the README says the commands write
    assert (tmp_path / "reg_out" / "output_grid.png").is_file()
    info = json.loads((tmp_path / "reg_out" / "registration.json").read_text())
    assert info["learnsim_version"] == __version__
    assert (tmp_path / "runs" / "my_metric" / "checkpoints" / "best.ckpt").is_file()
    for run in ("learnt", "ssd", "ssd_matched"):
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["learnsim_version"] == __version__, run
    for run in ("my_metric", "learnt", "ssd", "ssd_matched"):
        config = yaml.safe_load((tmp_path / "runs" / run / ".hydra" / "config.yaml").read_text())
        assert config["learnsim_version"] == __version__, run
    assert (tmp_path / "runs" / "compare" / "wilcoxon.csv").is_file()
