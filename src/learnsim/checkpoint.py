"""Reading learnsim checkpoints: safely (tensors and plain values only), and which module wrote them.

A checkpoint written by learnsim-train records the LightningModule class that wrote it under
:data:`MODULE_KEY` (``"LearnSimModule"`` or ``"VoxelMorphModule"``); older checkpoints without the key are
recognised by their state dict (a VoxelMorph network's weights live under ``net.``).
"""

from __future__ import annotations

import hashlib
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch

__all__ = ["MODULE_KEY", "ATLAS_KEY", "ModuleKind", "load_checkpoint", "checkpoint_module", "checkpoint_settings",
           "atlas_digest"]

#: the checkpoint key naming the LightningModule class that wrote the file
MODULE_KEY = "learnsim_module"
#: the checkpoint key holding :func:`atlas_digest` of the atlas the run was trained with (q_f's mean)
ATLAS_KEY = "learnsim_atlas_sha256"


def atlas_digest(image: torch.Tensor) -> str:
    """sha256 of an atlas image's voxels (float32, C order; shape included): a resumed run compares it with the
    atlas it is given now, so an atlas replaced under the same path is noticed."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


class ModuleKind(str, Enum):
    """The LightningModule a checkpoint comes from."""

    LEARNSIM = "LearnSimModule"
    VOXELMORPH = "VoxelMorphModule"


def load_checkpoint(ckpt: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a learnsim checkpoint safely: ``torch.load(weights_only=True)`` (no code from the file is run).

    Raises:
        FileNotFoundError: naming the checkpoint if it does not exist.
        ValueError: naming the checkpoint if it is not a torch checkpoint holding only tensors and plain Python
            values (a text file, a foreign pickle, a truncated file), or has no ``state_dict``.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...: the user needs the file name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: not a learnsim checkpoint (cannot be read as a torch checkpoint of tensors and plain values: {first})"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{path}: not a learnsim checkpoint (no state_dict)")
    return state


def checkpoint_module(state: dict) -> ModuleKind:
    """Which module wrote a loaded checkpoint (:data:`MODULE_KEY`; for older files, a ``net.`` weight means VoxelMorph)."""
    recorded = state.get(MODULE_KEY)
    if recorded is not None:
        return ModuleKind(recorded)
    legacy_vxm = any(k.startswith("net.") for k in state.get("state_dict", {}))
    return ModuleKind.VOXELMORPH if legacy_vxm else ModuleKind.LEARNSIM


def checkpoint_settings(state: dict) -> dict[str, Any]:
    """The registration settings a checkpoint's training run used, as :func:`learnsim.register` keywords.

    ``histmatch`` (from ``data.intensity``) and ``no_steps`` (from ``transformation.no_steps``), where the
    checkpoint's stored run config says; an empty dict for checkpoints without one.
    """
    cfg = state.get("learnsim_config") or {}
    out: dict[str, Any] = {}
    intensity = (cfg.get("data") or {}).get("intensity")
    if intensity in ("minmax", "histmatch"):
        out["histmatch"] = intensity == "histmatch"
    no_steps = (cfg.get("transformation") or {}).get("no_steps")
    if isinstance(no_steps, int):
        out["no_steps"] = no_steps
    return out
