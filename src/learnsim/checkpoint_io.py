"""Writing checkpoints atomically on every filesystem: a full disk never damages ``last.ckpt``.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in ``$TMPDIR``;
when the run folder is on another filesystem, the final move is a copy into the checkpoint's own name, so a full
disk or a kill during it leaves a truncated ``last.ckpt`` in place of the good one before it.
:class:`AtomicCheckpointIO` writes beside the checkpoint (:func:`learnsim.io.atomic_path`), flushes it to disk and
renames it into place: the old file stays whole until the new one is complete.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from learnsim.io import atomic_path

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are written beside the target, fsynced, then renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        return None


def use_atomic_checkpoints(trainer: pl.Trainer) -> bool:
    """Make ``trainer`` save with :class:`AtomicCheckpointIO` unless a custom CheckpointIO is configured; returns
    whether it did."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
