"""A checkpoint each time a learnt metric's energy ratio first passes a threshold (the paper-setting runs).

The original objective grows a learnt metric's scale, i.e. its energy ratio ``rho`` to the baseline
(:mod:`learnsim.energy_ratio`), as training goes on. To ask "is the gain a scale effect?" at several scales, this
callback keeps ``checkpoints/rho<threshold>.ckpt`` the first time the logged ``metric/energy_ratio`` (per step)
reaches each threshold: one file per threshold, never rewritten, remembered across a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["EnergyRatioCheckpoint"]


class EnergyRatioCheckpoint(pl.Callback):
    """Save ``dirpath/rho<t>.ckpt`` once when ``metric/energy_ratio`` first reaches each ``t`` of ``thresholds``.

    Args:
        thresholds: energy ratios (> 0), e.g. ``[10, 100, 1000]``.
        dirpath: folder of the checkpoints (default: the trainer's ``<default_root_dir>/checkpoints``).
        key: the logged value read after every training batch.
    """

    def __init__(self, thresholds: Sequence[float] = (10.0, 100.0, 1000.0), dirpath: str | None = None,
                 key: str = "metric/energy_ratio_step") -> None:
        values = [float(t) for t in thresholds]
        if not values or not all(math.isfinite(t) and t > 0 for t in values):
            raise ValueError(f"callbacks.energy_ratio.thresholds must be finite numbers > 0; got {list(thresholds)}")
        self.thresholds = sorted(values)
        self.dirpath = dirpath
        self.key = key
        self.fired: dict[float, dict[str, Any]] = {}  # threshold -> {"step", "ratio", "path"}

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        value = trainer.callback_metrics.get(self.key)
        if value is None:
            return
        ratio = float(value)
        for t in self.thresholds:
            if t in self.fired or not ratio >= t:
                continue
            path = self._dir(trainer) / f"rho{t:g}.ckpt"
            trainer.save_checkpoint(path)
            self.fired[t] = {"step": int(trainer.global_step), "ratio": ratio, "path": str(path)}
            print(f"learnsim: energy ratio {ratio:.4g} passed {t:g} at step {trainer.global_step}: {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"fired": {str(k): v for k, v in self.fired.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fired = {float(k): v for k, v in dict(state_dict.get("fired", {})).items()}
