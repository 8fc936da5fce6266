"""The atlas: the one fixed image of a cohort, on the working grid it defines.

Every pair of a pair list is registered to the same fixed image (checked by
:func:`learnsim.data.validate.validate_pairs`), and the working grid is built from it
(:func:`learnsim.data.preprocess.target_grid`). The atlas is therefore a property of the cohort, not of a pair:
:class:`learnsim.data.datamodule.PairDataModule` exposes it once, as :class:`Atlas`, after ``setup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from learnsim.data.preprocess import Preprocessed
from learnsim.grid import Grid

__all__ = ["Atlas"]


@dataclass(frozen=True, eq=False)
class Atlas:
    """The fixed image of every pair, preprocessed onto the working grid.

    Attributes:
        image: ``[1, 1, D, H, W]`` float32 in [0, 1] (brain-masked where a mask is given).
        mask: ``[1, 1, D, H, W]`` float32 0/1 brain mask (all ones when the pair list gives none).
        seg: ``[1, 1, D, H, W]`` int64 FreeSurfer label map, or None when the pair list gives none.
        grid: the working grid (shape ``(D, H, W)``, voxel -> mm affine).
        source: the fixed image's file.
    """

    image: Tensor
    mask: Tensor
    seg: Tensor | None
    grid: Grid
    source: Path

    def __post_init__(self) -> None:
        want = (1, 1, *self.grid.shape)
        for name in ("image", "mask", "seg"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"Atlas: {name} must be {list(want)} (the grid); got {list(t.shape)}")

    @classmethod
    def from_preprocessed(cls, p: Preprocessed, source: str | Path) -> Atlas:
        """The atlas from its preprocessed arrays (image float32, mask 0/1 or None, labels or None)."""
        image = torch.from_numpy(p.image).float()[None, None]
        mask = (
            torch.from_numpy(p.mask.astype(np.float32))[None, None]
            if p.mask is not None
            else torch.ones_like(image)
        )
        seg = torch.from_numpy(p.seg.astype(np.int64))[None, None] if p.seg is not None else None
        return cls(image, mask, seg, p.grid, Path(source))

    @property
    def has_seg(self) -> bool:
        return self.seg is not None
