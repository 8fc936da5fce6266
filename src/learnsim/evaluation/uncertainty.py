"""Registration uncertainty from posterior samples, and how well it is calibrated.

Uncertainty map (what the paper visualises): for displacement samples ``u_1..u_N`` of one pair (voxels), map each
to mm through the affine's linear part (:func:`learnsim.spatial.displacement_to_mm`) and take, voxel-wise,

    ``sigma(x) = sqrt( sum_c Var_n[u_n,c(x)] )``   (mm),

the square root of the trace of the per-voxel 3x3 covariance (the RMS distance of the samples from their mean).
It does not depend on the orientation of the world frame (a rotation leaves the trace unchanged), only on the true
spacing. ``Var`` is the population variance (ddof 0, ``correction=0``) by default: with antithetic pairs
``mu +/- delta`` this gives exactly ``|delta|``. ``reduce="components"`` returns the per-world-axis std instead.

Calibration (does high uncertainty mark where the registration is wrong?), voxel-wise inside a region (the fixed
brain mask when given, else the whole grid):

* disagreement: the fraction of the N warped segmentations that disagree with the voxel's majority label (0 when
  all samples agree, at most ``1 - 1/L``); labels outside the evaluated structures count as background;
* error: whether the segmentation warped by the posterior-mean transformation differs from the fixed segmentation
  at that voxel (again over the evaluated structures; 0/1).

Voxels are sorted by uncertainty and split into equal-count (quantile) bins; each bin reports its mean
uncertainty, mean disagreement and error rate. The scalar per run is the Spearman rank correlation between
uncertainty and each target on a seeded random voxel subsample of the region (ties are handled by average ranks;
NaN when either is constant, e.g. a single sample).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from learnsim.grid import affine_to_tensor
from learnsim.spatial import displacement_to_mm

__all__ = [
    "displacement_std_mm",
    "DisagreementCounter",
    "segmentation_disagreement",
    "segmentation_error",
    "calibration_bins",
    "subsample_region",
    "spearman",
]


def displacement_std_mm(
    samples: Tensor,
    affine: Tensor | np.ndarray,
    reduce: Literal["magnitude", "components"] = "magnitude",
    correction: int = 0,
) -> Tensor:
    """Voxel-wise standard deviation of displacement samples, in mm.

    Args:
        samples: ``[N, B, 3, D, H, W]`` displacements in voxels (channel c along tensor axis 2 + c). Processed one
            sample at a time (float32, accumulated as deviations from the first sample), so the memory cost beyond the input is a few
            ``[B, 3, D, H, W]`` buffers.
        affine: 4x4 voxel -> mm matrix of the grid.
        reduce: ``"magnitude"`` -> ``[B, 1, D, H, W]`` ``sqrt(sum_c var_c)``; ``"components"`` -> ``[B, 3, D, H, W]``
            std along each world axis of the affine.
        correction: ddof of the variance (0: population, 1: unbiased).
    Returns:
        float32 tensor in mm on the samples' device. Zero everywhere when ``N - correction <= 0``.
    """
    if samples.dim() != 6 or samples.shape[2] != 3:
        raise ValueError(
            f"displacement_std_mm: samples must be [N, B, 3, D, H, W] (voxels); got {tuple(samples.shape)}"
        )
    if reduce not in ("magnitude", "components"):
        raise ValueError(f"displacement_std_mm: reduce must be 'magnitude' or 'components'; got {reduce!r}")
    n = samples.shape[0]
    aff = affine_to_tensor(affine, device=samples.device)
    # Shift by the first sample before accumulating: sum/sum-of-squares of small deviations stay accurate.
    ref = displacement_to_mm(samples[0].float(), aff)
    s1 = torch.zeros_like(ref)
    s2 = torch.zeros_like(ref)
    for i in range(1, n):
        dev = displacement_to_mm(samples[i].float(), aff) - ref
        s1 += dev
        s2 += dev * dev
    denom = n - correction
    if denom <= 0:
        var = torch.zeros_like(ref)
    else:
        var = ((s2 - s1 * s1 / n) / denom).clamp_min(0.0)
    out = var.sum(dim=1, keepdim=True).sqrt() if reduce == "magnitude" else var.sqrt()
    return out.float()


class DisagreementCounter:
    """Streams warped segmentations and counts, per voxel, how many samples chose each evaluated label.

    Args:
        labels: evaluated label ids (a dict's keys are used); any other value counts as background (index 0).
        shape: the grid ``(D, H, W)``.
        device: where the counts live.
    Memory: ``(len(labels) + 1) * D * H * W`` int16 counts (64 MB at 128^3 with 15 structures); up to 32767
    samples.
    """

    def __init__(
        self,
        labels: Sequence[int] | Mapping[int, str],
        shape: Sequence[int],
        device: torch.device | str = "cpu",
    ):
        self.labels = [int(label) for label in labels]
        self.shape = tuple(int(s) for s in shape)
        top = max([0, *self.labels])
        self._lut = torch.zeros(top + 2, dtype=torch.int64, device=device)
        for i, label in enumerate(self.labels):
            if label >= 0:
                self._lut[label] = i + 1
        self._top = top
        self.counts = torch.zeros((len(self.labels) + 1, *self.shape), dtype=torch.int16, device=device)
        self.n = 0

    def index(self, seg: Tensor) -> Tensor:
        """Map a label map to label indices (0 = background/other) on the counter's device."""
        seg = seg.reshape(self.shape).to(self._lut.device).long()
        return self._lut[seg.clamp(0, self._top + 1)]

    def update(self, warped_seg: Tensor) -> None:
        """Add one warped segmentation ``[1, 1, D, H, W]`` or ``[D, H, W]``."""
        if tuple(warped_seg.shape[-3:]) != self.shape:
            raise ValueError(f"DisagreementCounter.update: grid {tuple(warped_seg.shape)} != {self.shape}")
        idx = self.index(warped_seg)
        self.counts.scatter_add_(0, idx[None], torch.ones_like(idx[None], dtype=torch.int16))
        self.n += 1

    def compute(self) -> Tensor:
        """``[1, 1, D, H, W]`` float32: fraction of samples that disagree with the majority label."""
        if self.n == 0:
            raise RuntimeError("DisagreementCounter.compute: no segmentation was added")
        top = self.counts.max(dim=0).values.float()
        return (1.0 - top / self.n)[None, None]


def segmentation_disagreement(warped_segs: Tensor, labels: Sequence[int] | Mapping[int, str]) -> Tensor:
    """Fraction of samples disagreeing with the majority label: ``[N, 1, 1, D, H, W]`` (or ``[N, D, H, W]``) ->
    ``[1, 1, D, H, W]``."""
    counter = DisagreementCounter(labels, warped_segs.shape[-3:], warped_segs.device)
    for seg in warped_segs:
        counter.update(seg)
    return counter.compute()


def segmentation_error(
    warped_seg: Tensor, fixed_seg: Tensor, labels: Sequence[int] | Mapping[int, str]
) -> Tensor:
    """Boolean ``[1, 1, D, H, W]``: voxels whose label (over the evaluated ``labels``, others = background) differs
    between the warped and the fixed segmentation."""
    if warped_seg.shape[-3:] != fixed_seg.shape[-3:]:
        raise ValueError(
            f"segmentation_error: grids differ: {tuple(warped_seg.shape)} vs {tuple(fixed_seg.shape)}"
        )
    counter = DisagreementCounter(labels, fixed_seg.shape[-3:], fixed_seg.device)
    return (counter.index(warped_seg) != counter.index(fixed_seg))[None, None]


def subsample_region(mask: Tensor | None, shape: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Flat voxel indices of a seeded random subsample (without replacement) of ``mask`` (or of the whole grid).

    Returns all region voxels (sorted) when the region has at most ``n`` voxels.
    """
    if mask is not None:
        region = np.flatnonzero(mask.detach().reshape(-1).cpu().numpy() > 0)
    else:
        region = np.arange(int(np.prod(shape)))
    if region.size <= n:
        return region
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(region, size=n, replace=False))


def _flat(x: Tensor | np.ndarray) -> np.ndarray:
    return (
        (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)).reshape(-1).astype(np.float64)
    )


def spearman(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two equally long samples; NaN when either is constant or has < 3 values."""
    a, b = _flat(x), _flat(y)
    if a.size != b.size:
        raise ValueError(f"spearman: sizes differ ({a.size} vs {b.size})")
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(a, b).statistic)


def calibration_bins(
    uncertainty: Tensor | np.ndarray,
    targets: Mapping[str, Tensor | np.ndarray],
    n_bins: int = 10,
) -> pd.DataFrame:
    """Equal-count uncertainty bins and the mean of each target per bin.

    Args:
        uncertainty: voxel uncertainties (any shape; flattened), e.g. a region subsample in mm.
        targets: name -> values of the same size (e.g. ``{"disagreement": ..., "error": ...}``).
        n_bins: number of quantile bins (fewer when there are fewer values).
    Returns:
        DataFrame with columns ``bin, u_lo, u_hi, u_mean, n_voxels`` and ``<name>_mean`` per target; voxels are
        ordered by uncertainty (stable sort) and split into bins of (nearly) equal count, so ties never leave a
        bin empty.
    """
    u = _flat(uncertainty)
    cols = {name: _flat(v) for name, v in targets.items()}
    for name, v in cols.items():
        if v.size != u.size:
            raise ValueError(f"calibration_bins: target {name!r} has {v.size} values, uncertainty {u.size}")
    columns = ["bin", "u_lo", "u_hi", "u_mean", "n_voxels", *[f"{k}_mean" for k in cols]]
    if u.size == 0:
        return pd.DataFrame(columns=columns)
    order = np.argsort(u, kind="stable")
    rows = []
    for i, chunk in enumerate(np.array_split(order, min(n_bins, u.size))):
        uc = u[chunk]
        row = {"bin": i, "u_lo": uc.min(), "u_hi": uc.max(), "u_mean": uc.mean(), "n_voxels": int(chunk.size)}
        row.update({f"{k}_mean": v[chunk].mean() for k, v in cols.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
