"""Validation / test metrics as torchmetrics ``Metric`` objects: the same number on 1 or N processes.

Each metric keeps, per registered pair, one row ``(pair index, sum, count)`` in a list state that torchmetrics
gathers from every rank (``dist_reduce_fx="cat"``) before :meth:`compute`. The result is ``sum / count`` over the
pairs, each pair counted once:

* pairs are de-duplicated by their dataset index, because :class:`learnsim.distributed.RankShardSampler` pads short
  shards by repeating pairs (a 3-pair validation on 2 ranks visits one pair twice);
* pooling sums and counts (rather than averaging per-rank means, which is what ``self.log(..., sync_dist=True)``
  does) weighs every pair x structure entry equally whatever the number of pairs each rank saw.

Definitions follow :mod:`learnsim.evaluation.metrics` and the evaluator:

* :class:`MeanDSC`: mean over pair x structure entries of the DSC; a structure absent from the fixed segmentation
  (or, when ``moving_seg`` is given, from the moving one: nothing to register) is left out; present in the fixed but
  lost by the warp counts as 0.
* :class:`MeanASD`: mean over pair x structure entries of the symmetric average surface distance in mm
  (:func:`~learnsim.evaluation.metrics.structure_metrics`; undefined entries left out).
* :class:`FoldingPercent`: folded voxels (``det J <= 0``) as a percentage of all voxels of all pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from learnsim.evaluation.metrics import folding, spacing_from_affine, structure_metrics
from learnsim.grid import affine_to_tensor
from learnsim.spatial import jacobian_det

__all__ = ["PairMean", "MeanDSC", "MeanASD", "FoldingPercent", "dice_entries"]


def _as_index(index: Tensor | Sequence[int] | None, n: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.full((n,), -1.0, dtype=torch.float64, device=device)
    idx = torch.as_tensor(index, dtype=torch.float64, device=device).reshape(-1)
    if idx.numel() != n:
        raise ValueError(f"index must have one entry per pair ({n}); got {idx.numel()}")
    return idx


def _labels_5d(x: Tensor, name: str, batch: int, fn: str) -> Tensor:
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"{fn}: {name} must be [B, 1, D, H, W]; got {tuple(x.shape)}")
    if x.shape[0] == 1 and batch > 1:  # the atlas, once for the batch
        x = x.expand(batch, *x.shape[1:])
    if x.shape[0] != batch:
        raise ValueError(f"{fn}: {name} has {x.shape[0]} pairs, warped_seg {batch}")
    return x


class PairMean(Metric):
    """``sum / count`` pooled over pairs, one row per pair, pairs de-duplicated by index across ranks.

    Subclasses compute the per-pair ``(sum, count)`` in ``update`` and call :meth:`add_rows`. Rows with a negative
    index (no index given) are never de-duplicated.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        # float64 states on every rank (an empty rank's placeholder takes this dtype too, so the gather matches)
        self.set_dtype(torch.float64)

    def add_rows(self, index: Tensor | Sequence[int] | None, sums: Tensor, counts: Tensor) -> None:
        """Append one ``(index, sum, count)`` row per pair; ``sums`` and ``counts`` are ``[B]``."""
        sums = sums.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        counts = counts.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        idx = _as_index(index, sums.numel(), self.device)
        self.rows.append(torch.stack([idx, sums, counts], dim=1))

    def pair_rows(self) -> Tensor:
        """``[P, 3]`` rows ``(index, sum, count)``, each index >= 0 once (its first row)."""
        rows = dim_zero_cat(self.rows) if len(self.rows) else torch.zeros(0, 3, dtype=torch.float64)
        rows = rows.reshape(-1, 3)
        if rows.shape[0] == 0:
            return rows
        idx = rows[:, 0]
        keep = idx < 0
        seen: set[int] = set()
        for i, v in enumerate(idx.tolist()):
            if v >= 0 and int(v) not in seen:
                seen.add(int(v))
                keep[i] = True
        return rows[keep]

    def compute(self) -> Tensor:
        """Pooled ``scale * sum / count`` (0-dim float64; NaN when nothing was counted)."""
        rows = self.pair_rows()
        total = rows[:, 2].sum()
        if rows.shape[0] == 0 or total <= 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return self.scale * rows[:, 1].sum() / total


def dice_entries(
    warped_seg: Tensor,
    fixed_seg: Tensor,
    labels: Sequence[int] | None = None,
    moving_seg: Tensor | None = None,
) -> Tensor:
    """Per-pair, per-structure DSC on any device: ``[B, L]`` with NaN where the entry does not count.

    Args:
        warped_seg: ``[B, 1, D, H, W]`` integer label maps (the moving segmentations warped, nearest).
        fixed_seg: ``[B or 1, 1, D, H, W]`` fixed segmentation(s).
        labels: structure ids; ``None`` = the non-zero labels of ``fixed_seg`` (all pairs).
        moving_seg: ``[B, 1, D, H, W]`` moving segmentations before warping; labels absent there are NaN.
    Rules as :func:`~learnsim.evaluation.metrics.structure_metrics`: absent in the fixed -> NaN; present in the
    fixed, absent in the warped -> 0.
    """
    fn = "dice_entries"
    if warped_seg.dim() != 5 or warped_seg.shape[1] != 1:
        raise ValueError(f"{fn}: warped_seg must be [B, 1, D, H, W]; got {tuple(warped_seg.shape)}")
    b = warped_seg.shape[0]
    fixed_seg = _labels_5d(fixed_seg, "fixed_seg", b, fn).to(warped_seg.device)
    if fixed_seg.shape[2:] != warped_seg.shape[2:]:
        raise ValueError(f"{fn}: fixed_seg grid {tuple(fixed_seg.shape[2:])} != {tuple(warped_seg.shape[2:])}")
    if labels is None:
        labels = [int(v) for v in torch.unique(fixed_seg).tolist() if v != 0]
    pred, ref = warped_seg.flatten(1), fixed_seg.flatten(1)
    mov = _labels_5d(moving_seg, "moving_seg", b, fn).to(warped_seg.device).flatten(1) if moving_seg is not None else None
    out = torch.full((b, len(labels)), float("nan"), dtype=torch.float64, device=warped_seg.device)
    for k, label in enumerate(labels):
        p, t = pred == label, ref == label
        n_t = t.sum(1)
        dsc = 2.0 * (p & t).sum(1).double() / (p.sum(1) + n_t).clamp_min(1).double()
        valid = n_t > 0
        if mov is not None:
            valid &= (mov == label).any(1)
        out[:, k] = torch.where(valid, dsc, out[:, k])
    return out


class LabelPairMean(PairMean):
    """A :class:`PairMean` over the structures ``labels`` (``None``: the non-zero labels of each fixed segmentation)."""

    def __init__(self, labels: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = None if labels is None else [int(v) for v in labels]


class MeanDSC(LabelPairMean):
    """Mean DSC over pair x structure entries (see :func:`dice_entries`), pooled across ranks.

    Args:
        labels: structure ids to evaluate; ``None`` = the non-zero labels of each pair's fixed segmentation.
    """

    higher_is_better = True

    def update(
        self,
        warped_seg: Tensor,
        fixed_seg: Tensor,
        moving_seg: Tensor | None = None,
        index: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add ``B`` pairs: label maps ``[B, 1, D, H, W]`` (``fixed_seg`` may be ``[1, 1, D, H, W]``); ``index``
        ``[B]`` dataset indices of the pairs (for de-duplication)."""
        d = dice_entries(warped_seg, fixed_seg, self.labels, moving_seg)
        ok = torch.isfinite(d)
        self.add_rows(index, torch.where(ok, d, torch.zeros_like(d)).sum(1), ok.sum(1))


class MeanASD(LabelPairMean):
    """Mean symmetric average surface distance (mm) over pair x structure entries, pooled across ranks.

    Computed on the CPU by :func:`~learnsim.evaluation.metrics.structure_metrics` (MONAI), HD95 skipped.
    """

    higher_is_better = False

    def update(
        self,
        warped_seg: Tensor,
        fixed_seg: Tensor,
        affine: Tensor | np.ndarray,
        moving_seg: Tensor | None = None,
        index: Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add ``B`` pairs (label maps as :class:`MeanDSC`); ``affine`` ``[4, 4]`` or ``[B, 4, 4]`` voxel -> mm."""
        fn = "MeanASD.update"
        if warped_seg.dim() != 5 or warped_seg.shape[1] != 1:
            raise ValueError(f"{fn}: warped_seg must be [B, 1, D, H, W]; got {tuple(warped_seg.shape)}")
        b = warped_seg.shape[0]
        fixed_seg = _labels_5d(fixed_seg, "fixed_seg", b, fn)
        aff = affine_to_tensor(affine, batched=True)
        aff = aff.reshape(-1, 4, 4).expand(b, 4, 4) if aff.reshape(-1, 4, 4).shape[0] == 1 else aff.reshape(-1, 4, 4)
        sums, counts = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        for i in range(b):
            labels = self.labels
            if labels is None:
                labels = [int(v) for v in torch.unique(fixed_seg[i]).tolist() if v != 0]
            if moving_seg is not None:
                present = set(torch.unique(moving_seg[i]).tolist())
                labels = [k for k in labels if k in present]
            res = structure_metrics(
                warped_seg[i : i + 1], fixed_seg[i : i + 1], labels, spacing_from_affine(aff[i]), hd95=False
            )
            vals = np.array([r["asd_mm"] for r in res.values()], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            sums[i], counts[i] = float(vals.sum()), float(vals.size)
        self.add_rows(index, sums, counts)


class FoldingPercent(PairMean):
    """Folded voxels (``det J <= 0`` of ``id + u``) as a percentage of all voxels of all pairs, across ranks."""

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(scale=100.0, **kwargs)

    def update(self, disp: Tensor, index: Tensor | Sequence[int] | None = None) -> None:
        """Add ``B`` transformations: ``disp`` ``[B, 3, D, H, W]`` displacements in voxels."""
        if disp.dim() != 5 or disp.shape[1] != 3:
            raise ValueError(f"FoldingPercent.update: disp must be [B, 3, D, H, W] (voxels); got {tuple(disp.shape)}")
        detj = jacobian_det(disp.detach())
        count, _ = folding(detj)
        total = torch.full_like(count, detj[0].numel(), dtype=torch.float64)
        self.add_rows(index, count.double(), total)
