"""Pairs (atlas, moving subject) as tensors on the atlas grid, preprocessed by :func:`learnsim.data.preprocess.preprocess`.

The same code that writes a cohort (demo, UK Biobank) runs here, so a CSV of raw files (any orientation, shape,
spacing) and a CSV of already preprocessed files give the same tensors; already preprocessed files on the target
grid are only copied, not interpolated.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from learnsim.data.atlas import Atlas
from learnsim.data.preprocess import (
    Grid,
    Preprocessed,
    Volume,
    as_dims,
    match_histogram,
    preprocess,
    target_grid,
)
from learnsim.data.validate import PairRecord, validate_pairs

__all__ = ["PairDataset", "BATCH_KEYS", "pair_ids", "pair_key"]

#: Keys of every item (and, collated, of every batch).
BATCH_KEYS = (
    "fixed",
    "moving",
    "fixed_mask",
    "moving_mask",
    "fixed_seg",
    "moving_seg",
    "has_seg",
    "index",
    "pair_id",
    "affine",
    "pair_key",
)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def pair_ids(records: Sequence[PairRecord]) -> list[str]:
    """A readable id per row: the moving image's folder name (``subjects/<id>/t1.nii.gz``, ``<ID>/T2_...``) when
    those are unique, else the file stem; where neither is unique, ``<folder>-<stem>`` for the clashing rows only
    (the subject's name is kept), with ``-<row>`` appended if that still clashes."""
    for candidate in ([r.moving.parent.name for r in records], [_stem(r.moving) for r in records]):
        if all(candidate) and len(set(candidate)) == len(candidate):
            return candidate
    names = [r.moving.parent.name or _stem(r.moving) for r in records]
    counts = Counter(names)
    names = [n if counts[n] == 1 else f"{r.moving.parent.name}-{_stem(r.moving)}".strip("-") for n, r in zip(names, records, strict=True)]
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{n}-{r.index}" for n, r in zip(names, records, strict=True)]


def pair_key(record: PairRecord, root: str | os.PathLike) -> str:
    """The identity of a pair for its per-pair state: 16 hex digits of sha256 over the fixed and moving paths.

    Paths are taken relative to ``root`` (the pair list's folder), so moving a cohort folder with its CSV keeps the
    keys, re-ordering rows keeps them, and a different pair never shares one.
    """
    root = os.path.abspath(root)
    rel = [os.path.relpath(os.path.abspath(p), root) for p in (record.fixed, record.moving)]
    return hashlib.sha256("\0".join(rel).encode()).hexdigest()[:16]


class PairDataset(Dataset):
    """Registration pairs from a CSV (see :mod:`learnsim.data.validate` for the format).

    Args:
        csv_path: the pair list; validated at construction (raises ``DataValidationError`` listing all problems).
        dims: working grid size (int or 3 ints); the grid is built from the fixed image (the atlas, one per list):
            RAS, zero-padded to a centred cube, resized to ``dims`` (:func:`learnsim.data.preprocess.target_grid`).
        structures: FreeSurfer ids to evaluate. Every given label map must contain them all (validated); other ids
            are set to background. ``None`` keeps every label.
        cache: keep preprocessed moving volumes in memory (the fixed image is always cached).
        intensity: ``"minmax"`` (the original: each image min-max scaled to [0, 1] inside its mask) or
            ``"histmatch"`` (then each moving image's histogram inside its mask is matched to the fixed image's:
            :func:`learnsim.data.preprocess.match_histogram`; for cohorts whose contrast differs from the atlas').

    The fixed side is the same for every row: :attr:`atlas`. Items are dicts with exactly :data:`BATCH_KEYS` (the
    ``fixed*`` and ``affine`` keys repeat the atlas in every item, for the modules that still read them there):

    * ``fixed``, ``moving``: ``[1, D, H, W]`` float32 in [0, 1] (brain-masked where a mask is given);
    * ``fixed_mask``, ``moving_mask``: ``[1, D, H, W]`` float32 0/1 (all ones without a mask column);
    * ``fixed_seg``, ``moving_seg``: ``[1, D, H, W]`` int64 FreeSurfer ids (zeros without a seg column);
    * ``has_seg``: bool scalar tensor, both label maps given;
    * ``index``: int64 scalar tensor, the row number in the CSV (the stable pair id for per-pair state);
    * ``pair_id``: str (see :func:`pair_ids`);
    * ``affine``: ``[4, 4]`` float64 voxel -> mm of the working grid;
    * ``pair_key``: str, the pair's identity for its stored q_v state (:func:`pair_key`).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        dims: int | Sequence[int] = (64, 64, 64),
        structures: Sequence[int] | None = None,
        cache: bool = True,
        intensity: str = "minmax",
    ):
        if intensity not in ("minmax", "histmatch"):
            raise ValueError(f"{csv_path}: data.intensity must be 'minmax' or 'histmatch'; got {intensity!r}")
        self.intensity = intensity
        self.csv_path = Path(csv_path)
        self.structures = tuple(int(s) for s in structures) if structures is not None else None
        self.records = validate_pairs(self.csv_path, required_labels=self.structures)
        self.pair_ids = pair_ids(self.records)
        self.pair_keys = [pair_key(r, self.csv_path.parent) for r in self.records]
        self.dims = as_dims(dims)
        header = Grid.from_nifti(self.records[0].fixed)  # the voxels are read once, by _load_fixed below
        self.grid: Grid = target_grid(header.shape, header.affine, self.dims)
        self.cache = cache
        self._fixed: dict[Path, Preprocessed] = {}
        self._moving: dict[int, Preprocessed] = {}
        self.notes: list[str] = []
        self._atlas: Atlas | None = None
        # the fixed image is shared by all rows: preprocess it now, so forked workers share the copy
        self._load_fixed(self.records[0])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    def _load(self, image: Path, mask: Path | None, seg: Path | None) -> Preprocessed:
        out = preprocess(
            Volume.load(image),
            self.grid,
            Volume.load(mask) if mask is not None else None,
            Volume.load(seg) if seg is not None else None,
        )
        if out.seg is not None and self.structures is not None:
            out.seg = np.where(np.isin(out.seg, self.structures), out.seg, 0).astype(out.seg.dtype)
        self.notes.extend(n for n in out.notes if n not in self.notes)
        return out

    def _load_fixed(self, rec: PairRecord) -> Preprocessed:
        hit = self._fixed.get(rec.fixed)
        if hit is None:
            hit = self._load(rec.fixed, rec.fixed_mask, rec.fixed_seg)
            self._fixed[rec.fixed] = hit
        return hit

    def _load_moving(self, rec: PairRecord) -> Preprocessed:
        hit = self._moving.get(rec.index)
        if hit is None:
            hit = self._load(rec.moving, rec.moving_mask, rec.moving_seg)
            if self.intensity == "histmatch":
                fixed = self._load_fixed(rec)
                hit.image = match_histogram(hit.image, hit.mask, fixed.image, fixed.mask)
            if self.cache:
                self._moving[rec.index] = hit
        return hit

    @property
    def atlas(self) -> Atlas:
        """The fixed image of every row (:class:`~learnsim.data.atlas.Atlas`: image, mask, seg, grid), built once."""
        if self._atlas is None:
            rec = self.records[0]
            self._atlas = Atlas.from_preprocessed(self._load_fixed(rec), rec.fixed)
        return self._atlas

    def _tensors(self, p: Preprocessed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(p.image).float().unsqueeze(0)
        msk = (
            torch.from_numpy(p.mask.astype(np.float32)).unsqueeze(0)
            if p.mask is not None
            else torch.ones_like(img)
        )
        seg = (
            torch.from_numpy(p.seg.astype(np.int64)).unsqueeze(0)
            if p.seg is not None
            else torch.zeros(img.shape, dtype=torch.int64)
        )
        return img, msk, seg

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.records):
            raise IndexError(f"PairDataset: index {i} out of range for {len(self.records)} pairs")
        rec = self.records[i]
        f_img, f_msk, f_seg = self._tensors(self._load_fixed(rec))
        m_img, m_msk, m_seg = self._tensors(self._load_moving(rec))
        return {
            "fixed": f_img,
            "moving": m_img,
            "fixed_mask": f_msk,
            "moving_mask": m_msk,
            "fixed_seg": f_seg,
            "moving_seg": m_seg,
            "has_seg": torch.tensor(rec.has_seg),
            "index": torch.tensor(rec.index, dtype=torch.int64),
            "pair_id": self.pair_ids[i],
            "affine": self.grid.affine_tensor(),
            "pair_key": self.pair_keys[i],
        }
