"""The experiment logger of the Hydra entry points: wandb runs offline unless the config says otherwise."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["is_wandb", "prepare_wandb"]


def is_wandb(logger_cfg: Any) -> bool:
    """True when the ``logger`` config group instantiates a wandb logger."""
    return bool(logger_cfg) and "_target_" in logger_cfg and "Wandb" in str(logger_cfg["_target_"])


def prepare_wandb(logger_cfg: Any) -> str:
    """Set wandb's environment before it starts: silent, and offline (no account, no network) unless
    ``logger.offline`` is false; variables the user set win. Returns the mode, ``"offline"`` or ``"online"``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    offline = bool(logger_cfg.get("offline", True))
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return "offline" if offline else "online"
