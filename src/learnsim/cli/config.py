"""Where the Hydra configs live and how the entry points find them.

``conf/`` sits at the repository root (an editable install finds it there); ``LEARNSIM_CONF`` points elsewhere,
and Hydra's own ``--config-dir`` adds a folder of the user's configs on top.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    env = os.environ.get("LEARNSIM_CONF")
    if env:
        return str(Path(env).resolve())
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf" / "train.yaml").is_file():
            return str(parent / "conf")
    raise FileNotFoundError("learnsim: cannot find the Hydra configs (conf/train.yaml); set LEARNSIM_CONF=/path/to/conf")


def to_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python (for checkpoints and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
