"""The experiment logger of the Hydra entry points: wandb runs offline unless the config says otherwise."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["is_wandb", "prepare_wandb"]


def is_wandb(logger_cfg: Any) -> bool:
    """True when the ``logger`` config group instantiates a wandb logger (its ``_target_`` is a ``WandbLogger``)."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return False
    from hydra.utils import get_class
    from lightning.pytorch.loggers import WandbLogger

    return issubclass(get_class(str(logger_cfg["_target_"])), WandbLogger)


def prepare_wandb(logger_cfg: Any) -> str:
    """Set wandb's environment before it starts: silent, and offline (no account, no network) unless
    ``logger.offline`` is false; variables the user set win. Returns the mode, ``"offline"`` or ``"online"``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    offline = bool(logger_cfg.get("offline", True))
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return "offline" if offline else "online"
