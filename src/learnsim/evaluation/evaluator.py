"""The evaluation of one test run: called once per registered pair, finalised once at the end.

Outputs under ``out_dir`` (all written atomically):

* ``pairs/<pair_id>/`` — ``warped.nii.gz`` (moving image warped by the posterior-mean transformation, trilinear),
  ``warped_seg.nii.gz`` (moving segmentation, nearest), ``disp_mm.nii.gz`` (mean displacement in mm along the
  affine's world axes, ``[D, H, W, 3]``), ``uncertainty_mm.nii.gz`` (displacement std, see
  :mod:`learnsim.evaluation.uncertainty`), all on the fixed grid with the fixed affine; ``output_grid.png``;
  ``label_overlay.png`` (with segmentations: the atlas' outlines, the moving segmentation's before registration
  and the warped one's after, on the fixed image, see :func:`learnsim.evaluation.figures.label_overlay`);
  ``summary.json`` (the dict :meth:`Evaluator.add_pair` returns).
* ``metrics.csv`` — one row per pair x sample x structure: ``pair, sample, structure, label, dsc, asd_mm, hd95_mm``
  (``sample`` = 0..n-1, the first ``metric_samples`` posterior samples).
* ``metrics_mean.csv`` — the same columns for the posterior-mean transformation (``sample`` = ``-1``), kept apart so
  that averages over ``metrics.csv`` are over samples only.
* ``metrics_before.csv`` — the same columns before registration (the identity, i.e. affine-only; ``sample`` = ``-2``):
  the start every run is compared with.
* ``per_pair.csv`` — ``pair, folding_voxels, folding_pct, sdlogj, seconds`` then further per-pair values
  (``folding_*_mask``, ``detj_min/max``, ``n_samples``, ``n_metric_samples``, ``uncertainty_mean_mm``,
  ``spearman_disagreement``, ``spearman_error``, DSC/ASD/HD95 means of the pair) and the caller's ``extra`` keys.
* ``calibration_bins.csv`` — uncertainty quantile bins pooled over pairs (seeded voxel subsample per pair, drawn
  near the evaluated structures: see ``calibration_margin``).
* ``summary.json`` — mean / std / count per structure and overall for ``dsc``, ``asd_mm``, ``hd95_mm`` (over
  pair x sample rows, NaNs excluded and counted), and for the per-pair values; calibration Spearman (mean over
  pairs and pooled).
* ``boxplots.png`` (DSC, ASD, HD95 per structure) and ``calibration.png``.

Structures missing from the fixed segmentation, or from the moving segmentation before warping (nothing to
register), get NaN DSC / ASD / HD95; a structure the warp loses entirely gets DSC 0 and NaN distances (see
:mod:`learnsim.evaluation.metrics`). Summaries skip NaNs and count them (``n_nan``).

Regularity (folding, SDlogJ) is of the posterior-mean transformation: folding over the whole grid (and inside the
mask as ``folding_*_mask``), SDlogJ inside the fixed brain mask when one is given.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim import io
from learnsim.evaluation import figures as figs
from learnsim.evaluation.metrics import STRUCTURES, jacobian_stats, spacing_from_affine, structure_metrics
from learnsim.evaluation.uncertainty import (
    DisagreementCounter,
    calibration_bins,
    displacement_std_mm,
    segmentation_error,
    spearman,
    subsample_region,
)
from learnsim.grid import affine_to_numpy, affine_to_tensor
from learnsim.spatial import displacement_to_mm, warp, warp_labels

__all__ = ["Evaluator", "OverlapAccumulator", "CalibrationAccumulator", "regularity_row", "METRIC_COLUMNS",
           "PER_PAIR_COLUMNS"]

METRIC_COLUMNS = ["pair", "sample", "structure", "label", "dsc", "asd_mm", "hd95_mm"]
PER_PAIR_COLUMNS = ["pair", "folding_voxels", "folding_pct", "sdlogj", "seconds"]
_VALUE_COLUMNS = ("dsc", "asd_mm", "hd95_mm")
_PAIR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def _stats(values: Any) -> dict[str, float | int | None]:
    """mean, sample std (ddof 1), count of finite values and count of NaNs; JSON-safe (NaN -> None)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = arr[np.isfinite(arr)]
    mean = float(finite.mean()) if finite.size else None
    std = float(finite.std(ddof=1)) if finite.size > 1 else None
    return {"mean": mean, "std": std, "n": int(finite.size), "n_nan": int(arr.size - finite.size)}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _vol(x: Tensor, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
    if x.dim() != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"Evaluator.add_pair: {name} must be [1, 1, D, H, W]; got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[2:]) != shape:
        raise ValueError(f"Evaluator.add_pair: {name} grid {tuple(x.shape[2:])} != fixed grid {shape}")
    return x


@dataclass
class _Pair:
    """One pair's checked inputs, on the samples' device: volumes ``[1, 1, D, H, W]`` (mask bool, segs int64 or
    None), ``sample_disps [N, 1, 3, D, H, W]`` and ``mean_disp [1, 3, D, H, W]`` in voxels, the 4x4 affine."""

    pair_id: str
    fixed: Tensor
    moving: Tensor
    fixed_seg: Tensor | None
    moving_seg: Tensor | None
    mask: Tensor | None
    affine: np.ndarray
    sample_disps: Tensor
    mean_disp: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed.shape[2:])

    @property
    def has_seg(self) -> bool:
        return self.fixed_seg is not None and self.moving_seg is not None


class OverlapAccumulator:
    """DSC / ASD / HD95 rows per pair x sample x structure: posterior samples (``metrics.csv``), the mean
    transformation (``metrics_mean.csv``, sample -1) and no registration (``metrics_before.csv``, sample -2)."""

    def __init__(self, structures: dict[int, str], surface: bool) -> None:
        self.structures, self.surface = structures, surface
        self.samples: list[dict[str, Any]] = []
        self.mean: list[dict[str, Any]] = []
        self.before: list[dict[str, Any]] = []

    def rows(self, pair_id: str, sample: int, warped_seg: Tensor, fixed_seg: Tensor, spacing,
             unlabelled: set[int]) -> list[dict]:
        """One row per structure; structures the moving segmentation does not label were never registrable: NaN."""
        labels = [k for k in self.structures if k not in unlabelled]
        res = structure_metrics(warped_seg, fixed_seg, labels, spacing, surface=self.surface)
        nan = {"dsc": float("nan"), "asd_mm": float("nan"), "hd95_mm": float("nan")}
        return [
            {"pair": pair_id, "sample": sample, "structure": name, "label": label, **res.get(label, nan)}
            for label, name in self.structures.items()
        ]

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(samples, mean transformation, before registration)`` tables."""
        return tuple(pd.DataFrame(r, columns=METRIC_COLUMNS) for r in (self.samples, self.mean, self.before))


class CalibrationAccumulator:
    """Uncertainty against sample disagreement and segmentation error, on a seeded voxel subsample per pair,
    pooled over pairs into quantile bins (``calibration_bins.csv``)."""

    def __init__(self, structures: dict[int, str], voxels: int, margin: int | None, n_bins: int, seed: int) -> None:
        self.structures, self.voxels, self.margin, self.n_bins, self.seed = structures, voxels, margin, n_bins, seed
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.owners: list[str] = []  # the pair of each part

    def region(self, mask: Tensor | None, fixed_seg: Tensor, warped_seg: Tensor, disagreement: Tensor) -> Tensor | None:
        """Voxels near the evaluated structures (fixed, mean-warped, or chosen by any sample), grown by ``margin``
        voxels, inside the mask. Far from every structure no sample can disagree and nothing can be wrong, so those
        voxels would only dilute the bins."""
        if self.margin is None:
            return mask
        labels = torch.tensor(list(self.structures), device=fixed_seg.device)
        near = torch.isin(fixed_seg, labels) | torch.isin(warped_seg, labels) | (disagreement > 0)
        m = int(self.margin)
        if m > 0:
            near = F.max_pool3d(near.float(), kernel_size=2 * m + 1, stride=1, padding=m) > 0
        return near & mask if mask is not None else near

    def add(self, pair_id: str, shape: tuple[int, ...], uncertainty: Tensor, disagreement: Tensor, error: Tensor,
            region: Tensor | None) -> dict[str, float]:
        """Subsample one pair's maps; returns its Spearman correlations."""
        pair_seed = (self.seed + zlib.crc32(pair_id.encode())) % (2**32)
        idx = subsample_region(region, shape, self.voxels, pair_seed)
        u, d, e = (x.reshape(-1).cpu().numpy()[idx].astype(np.float64) for x in (uncertainty, disagreement, error))
        self.parts.append((u, d, e))
        self.owners.append(pair_id)
        return {"spearman_disagreement": spearman(u, d), "spearman_error": spearman(u, e)}

    def pooled(self) -> tuple[pd.DataFrame | None, dict[str, float | None]]:
        """Quantile bins and Spearman correlations over all pairs' subsamples (None without segmentations)."""
        if not self.parts:
            return None, {"spearman_disagreement": None, "spearman_error": None}
        u, d, e = (np.concatenate(parts) for parts in zip(*self.parts, strict=True))
        bins = calibration_bins(u, {"disagreement": d, "error": e}, self.n_bins)
        return bins, {"spearman_disagreement": spearman(u, d), "spearman_error": spearman(u, e)}


def regularity_row(mean_disp: Tensor, mask: Tensor | None) -> dict[str, Any]:
    """Folding (whole grid and inside the mask) and SDlogJ of the posterior-mean transformation."""
    reg = jacobian_stats(mean_disp, mask)
    keys = ("folding_voxels", "folding_pct", "sdlogj")
    rest = ("folding_voxels_mask", "folding_pct_mask", "detj_min", "detj_max")
    return {**{k: reg[k] for k in keys}, "seconds": None, **{k: reg[k] for k in rest}}


class Evaluator:
    """Collects per-pair results of a test run and writes the run's tables, maps and figures.

    Args:
        out_dir: run output folder (created).
        structures: label id -> name of the evaluated structures (default :data:`STRUCTURES`).
        save_nifti: write the per-pair NIfTI maps.
        figures: write the per-pair output grid and label overlay, and the run's box and calibration plots.
        seed: seeds the calibration voxel subsample (combined with a hash of the pair id, so results do not depend
            on the order of pairs).
        metric_samples: DSC / ASD / HD95 are computed for the first ``metric_samples`` samples (5 for metrics,
            50 for uncertainty in the paper); ``None`` = all samples. The uncertainty and the disagreement use all
            samples.
        surface_metrics: compute ASD and HD95 (else NaN; DSC only).
        calibration_voxels: voxels drawn per pair for the calibration analysis (seeded, without replacement).
        calibration_margin: the calibration region is the voxels within this many voxels (chessboard distance) of
            an evaluated structure in the fixed, the mean-warped or any sample's segmentation, inside the fixed
            mask; ``None`` = the whole mask (or grid).
        n_bins: uncertainty quantile bins.
        run_name: legend name in the run's plots (default the folder name).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        structures: dict[int, str] | None = None,
        save_nifti: bool = True,
        figures: bool = True,
        seed: int = 0,
        metric_samples: int | None = 5,
        surface_metrics: bool = True,
        calibration_voxels: int = 20000,
        calibration_margin: int | None = 3,
        n_bins: int = 10,
        run_name: str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.structures = dict(STRUCTURES if structures is None else structures)
        self.save_nifti = save_nifti
        self.figures = figures
        self.seed = int(seed)
        if metric_samples is not None and metric_samples < 1:
            raise ValueError(f"Evaluator: metric_samples must be >= 1 or None; got {metric_samples}")
        self.metric_samples = metric_samples
        self.calibration_voxels = int(calibration_voxels)
        self.run_name = run_name or self.out_dir.resolve().name
        self.overlap = OverlapAccumulator(self.structures, surface_metrics)
        self.calibration = CalibrationAccumulator(self.structures, self.calibration_voxels, calibration_margin,
                                                  int(n_bins), self.seed)
        self._pairs: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_pair(
        self,
        pair_id: str,
        fixed: Tensor,
        moving: Tensor,
        fixed_seg: Tensor | None,
        moving_seg: Tensor | None,
        fixed_mask: Tensor | None,
        affine: Tensor | np.ndarray,
        sample_disps: Tensor,
        mean_disp: Tensor,
        seconds: float,
        extra: dict | None = None,
    ) -> dict:
        """Evaluate one registered pair.

        Args:
            pair_id: unique name, used as a folder name (letters, digits, ``._+=-``).
            fixed, moving: ``[1, 1, D, H, W]`` float intensities in [0, 1].
            fixed_seg, moving_seg: ``[1, 1, D, H, W]`` int64 label maps, or ``None`` (no overlap metrics and no
                calibration then).
            fixed_mask: ``[1, 1, D, H, W]`` brain mask of the fixed image, or ``None`` (whole grid).
            affine: 4x4 voxel -> mm matrix of the fixed grid.
            sample_disps: ``[N, 1, 3, D, H, W]`` displacements in voxels of N >= 1 posterior samples.
            mean_disp: ``[1, 3, D, H, W]`` displacement in voxels of the posterior-mean transformation.
            seconds: registration time of the pair.
            extra: further per-pair scalars for ``per_pair.csv`` (e.g. final loss).
        Returns:
            The per-pair summary (the ``per_pair.csv`` row).
        """
        t0 = time.perf_counter()
        p = self._check_pair(pair_id, fixed, moving, fixed_seg, moving_seg, fixed_mask, affine, sample_disps, mean_disp)
        n = int(p.sample_disps.shape[0])
        n_metric = n if self.metric_samples is None else min(n, self.metric_samples)
        warped = warp(p.moving, p.mean_disp)
        summary = {"pair": pair_id, **regularity_row(p.mean_disp, p.mask)}
        summary["seconds"] = float(seconds)
        uncertainty = displacement_std_mm(p.sample_disps, p.affine)  # [1, 1, D, H, W] mm
        rows: list[dict[str, Any]] = []
        warped_seg_mean = None
        calib: dict[str, float] = {"spearman_disagreement": float("nan"), "spearman_error": float("nan")}
        if p.has_seg:
            rows, warped_seg_mean, calib = self._overlap_and_calibration(p, uncertainty, n_metric)
        self.overlap.samples.extend(rows)
        region_unc = uncertainty[p.mask] if p.mask is not None else uncertainty
        summary.update(
            n_samples=n,
            n_metric_samples=n_metric if p.has_seg else 0,
            uncertainty_mean_mm=float(region_unc.mean()) if region_unc.numel() else float("nan"),
            **calib,
        )
        for col in _VALUE_COLUMNS:
            summary[f"{col}_mean"] = _stats([r[col] for r in rows])["mean"] if rows else None
        for key, value in (extra or {}).items():
            if key in summary:
                raise ValueError(f"Evaluator.add_pair: extra key {key!r} clashes with a computed column")
            summary[key] = value.item() if isinstance(value, Tensor | np.generic) else value
        self._write_pair(p, warped, warped_seg_mean, uncertainty)
        summary["eval_seconds"] = time.perf_counter() - t0
        _write_json(self.out_dir / "pairs" / pair_id / "summary.json", summary)
        self._pairs.append(summary)
        return summary

    def _check_pair(self, pair_id, fixed, moving, fixed_seg, moving_seg, fixed_mask, affine, sample_disps,
                    mean_disp) -> _Pair:
        """Validate :meth:`add_pair`'s arguments (errors name the argument and the shape) and move them to the
        samples' device."""
        if not isinstance(pair_id, str) or not _PAIR_ID.match(pair_id):
            raise ValueError(
                f"Evaluator.add_pair: pair_id must match {_PAIR_ID.pattern} (a folder name); got {pair_id!r}"
            )
        if any(p["pair"] == pair_id for p in self._pairs):
            raise ValueError(f"Evaluator.add_pair: pair {pair_id!r} was already added")
        fixed = _vol(fixed, "fixed")
        shape = tuple(fixed.shape[2:])
        moving = _vol(moving, "moving", shape)
        if sample_disps.dim() != 6 or sample_disps.shape[1:3] != (1, 3) or tuple(sample_disps.shape[3:]) != shape:
            raise ValueError(
                f"Evaluator.add_pair: sample_disps must be [N, 1, 3, {shape}]; got {tuple(sample_disps.shape)}"
            )
        if sample_disps.shape[0] < 1:
            raise ValueError("Evaluator.add_pair: sample_disps needs at least one sample")
        if mean_disp.dim() != 5 or mean_disp.shape[:2] != (1, 3) or tuple(mean_disp.shape[2:]) != shape:
            raise ValueError(f"Evaluator.add_pair: mean_disp must be [1, 3, {shape}]; got {tuple(mean_disp.shape)}")
        if (fixed_seg is None) != (moving_seg is None):
            raise ValueError("Evaluator.add_pair: give both fixed_seg and moving_seg, or neither")
        device = sample_disps.device
        mask = _vol(fixed_mask, "fixed_mask", shape).to(device) > 0 if fixed_mask is not None else None
        if fixed_seg is not None and moving_seg is not None:
            fixed_seg = _vol(fixed_seg, "fixed_seg", shape).to(device)
            moving_seg = _vol(moving_seg, "moving_seg", shape).to(device)
        return _Pair(pair_id, fixed.to(device), moving.to(device), fixed_seg, moving_seg, mask, affine_to_numpy(affine),
                     sample_disps, mean_disp.to(device=device, dtype=sample_disps.dtype))

    def _overlap_and_calibration(self, p: _Pair, uncertainty: Tensor, n_metric: int):
        """Overlap rows of the mean transformation, before registration and the first ``n_metric`` samples, and the
        calibration of the uncertainty; streams over samples (one warped segmentation in memory at a time).

        Returns ``(sample rows, mean-warped segmentation, Spearman correlations)``."""
        spacing = spacing_from_affine(p.affine)
        present = set(torch.unique(p.moving_seg).tolist())
        unlabelled = {k for k in self.structures if k not in present}
        warped_seg_mean = warp_labels(p.moving_seg, p.mean_disp)
        self.overlap.mean.extend(self.overlap.rows(p.pair_id, -1, warped_seg_mean, p.fixed_seg, spacing, unlabelled))
        self.overlap.before.extend(self.overlap.rows(p.pair_id, -2, p.moving_seg, p.fixed_seg, spacing, unlabelled))
        counter = DisagreementCounter(self.structures, p.shape, p.sample_disps.device)
        rows: list[dict[str, Any]] = []
        for i in range(p.sample_disps.shape[0]):
            ws = warp_labels(p.moving_seg, p.sample_disps[i])
            counter.update(ws)
            if i < n_metric:
                rows.extend(self.overlap.rows(p.pair_id, i, ws, p.fixed_seg, spacing, unlabelled))
        disagreement = counter.compute()
        del counter
        error = segmentation_error(warped_seg_mean, p.fixed_seg, self.structures)
        region = self.calibration.region(p.mask, p.fixed_seg, warped_seg_mean, disagreement)
        calib = self.calibration.add(p.pair_id, p.shape, uncertainty, disagreement, error, region)
        return rows, warped_seg_mean, calib

    def _write_pair(self, p: _Pair, warped: Tensor, warped_seg_mean: Tensor | None, uncertainty: Tensor) -> None:
        """The pair's NIfTI maps and figures under ``pairs/<pair_id>/`` (as configured)."""
        pair_dir, affine_np = self.out_dir / "pairs" / p.pair_id, p.affine
        if self.save_nifti:
            io.save_nifti(pair_dir / "warped.nii.gz", warped[0, 0].float().cpu().numpy(), affine_np, np.float32)
            if warped_seg_mean is not None:
                seg_np = warped_seg_mean[0, 0].cpu().numpy()
                io.save_nifti(pair_dir / "warped_seg.nii.gz", seg_np, affine_np,
                              np.int16 if seg_np.max(initial=0) < 2**15 else np.int32)
            disp_mm = displacement_to_mm(p.mean_disp.float(), affine_to_tensor(affine_np))[0].permute(1, 2, 3, 0)
            io.save_nifti(pair_dir / "disp_mm.nii.gz", disp_mm.cpu().numpy(), affine_np, np.float32)
            io.save_nifti(pair_dir / "uncertainty_mm.nii.gz", uncertainty[0, 0].cpu().numpy(), affine_np, np.float32)
        if not self.figures:
            return
        figs.output_grid(pair_dir / "output_grid.png", p.fixed, p.moving, warped, p.mean_disp, affine_np, uncertainty,
                         p.mask, title=f"{self.run_name}: {p.pair_id}")
        if warped_seg_mean is not None:
            figs.label_overlay(pair_dir / "label_overlay.png", p.fixed, warped_seg_mean, affine_np,
                               fixed_seg=p.fixed_seg, moving_seg=p.moving_seg, structures=self.structures,
                               title=f"{self.run_name}: {p.pair_id} (posterior-mean transformation)")

    def pop_pair(self, pair_id: str) -> dict[str, Any]:
        """Take an added pair's rows out of the run (a cohort run keeps them on disk instead of in memory:
        :mod:`learnsim.evaluation.cohort`): ``summary``, ``metrics``, ``metrics_mean``, ``metrics_before`` (lists
        of rows) and ``calibration`` (its ``(uncertainty, disagreement, error)`` subsample, or None)."""
        def take(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            mine = [r for r in rows if r["pair"] == pair_id]
            rows[:] = [r for r in rows if r["pair"] != pair_id]
            return mine

        summary = take(self._pairs)
        if len(summary) != 1:
            raise ValueError(f"Evaluator.pop_pair: pair {pair_id!r} was not added")
        cal = self.calibration
        calibration = next((p for p, o in zip(cal.parts, cal.owners, strict=True) if o == pair_id), None)
        keep = [i for i, o in enumerate(cal.owners) if o != pair_id]
        cal.parts, cal.owners = [cal.parts[i] for i in keep], [cal.owners[i] for i in keep]
        return {"summary": summary[0], "metrics": take(self.overlap.samples), "metrics_mean": take(self.overlap.mean),
                "metrics_before": take(self.overlap.before), "calibration": calibration}

    def restore_pair(self, summary: dict[str, Any], metrics: list[dict[str, Any]], metrics_mean: list[dict[str, Any]],
                     metrics_before: list[dict[str, Any]], calibration: Any = None) -> None:
        """Put back a pair that :meth:`pop_pair` took out (read from its cohort record), in the run's order."""
        self._pairs.append(dict(summary))
        self.overlap.samples.extend(metrics)
        self.overlap.mean.extend(metrics_mean)
        self.overlap.before.extend(metrics_before)
        if calibration is not None:
            self.calibration.parts.append(tuple(np.asarray(a, dtype=np.float64) for a in calibration))
            self.calibration.owners.append(str(summary["pair"]))

    # ------------------------------------------------------------------------------------------------------------
    def metrics_table(self) -> pd.DataFrame:
        """The rows of ``metrics.csv`` so far."""
        return pd.DataFrame(self.overlap.samples, columns=METRIC_COLUMNS)

    def per_pair_table(self) -> pd.DataFrame:
        """The rows of ``per_pair.csv`` so far (required columns first)."""
        df = pd.DataFrame(self._pairs)
        if df.empty:
            return pd.DataFrame(columns=PER_PAIR_COLUMNS)
        return df[PER_PAIR_COLUMNS + [c for c in df.columns if c not in PER_PAIR_COLUMNS]]

    def finalize(self) -> dict:
        """Write the run's tables, summary and plots; return the summary dict (see module docstring)."""
        metrics, mean_rows, before_rows = self.overlap.tables()
        per_pair = self.per_pair_table()
        _write_csv(self.out_dir / "metrics.csv", metrics)
        _write_csv(self.out_dir / "metrics_mean.csv", mean_rows)
        _write_csv(self.out_dir / "metrics_before.csv", before_rows)
        _write_csv(self.out_dir / "per_pair.csv", per_pair)

        bins, pooled = self.calibration.pooled()
        if bins is not None:
            _write_csv(self.out_dir / "calibration_bins.csv", bins)

        from learnsim import __version__

        summary: dict[str, Any] = {
            "run": self.run_name,
            "learnsim_version": __version__,
            "n_pairs": len(self._pairs),
            "n_rows": len(metrics),
            "structures": {},
            "overall": {col: _stats(metrics[col]) for col in _VALUE_COLUMNS},
        }
        for label, name in self.structures.items():
            sub = metrics[metrics["label"] == label]
            summary["structures"][name] = {
                "label": label,
                **{col: _stats(sub[col]) for col in _VALUE_COLUMNS},
            }
        summary["mean_transformation"] = {col: _stats(mean_rows[col]) for col in _VALUE_COLUMNS}
        summary["before_registration"] = {col: _stats(before_rows[col]) for col in _VALUE_COLUMNS}
        for col in (
            "folding_voxels",
            "folding_pct",
            "folding_pct_mask",
            "sdlogj",
            "seconds",
            "uncertainty_mean_mm",
        ):
            summary[col] = _stats(per_pair[col]) if col in per_pair else _stats([])
        # the likelihood: the precision each fit ended with, and the metric's energy ratio to its baseline
        for col in ("data_weight", "decimation", "energy_ratio"):
            if col in per_pair:
                summary[col] = _stats(per_pair[col])
        summary["calibration"] = {
            "spearman_disagreement": _stats(per_pair["spearman_disagreement"])
            if len(per_pair)
            else _stats([]),
            "spearman_error": _stats(per_pair["spearman_error"]) if len(per_pair) else _stats([]),
            "pooled_spearman_disagreement": pooled["spearman_disagreement"],
            "pooled_spearman_error": pooled["spearman_error"],
            "voxels_per_pair": self.calibration_voxels,
        }
        _write_json(self.out_dir / "summary.json", summary)

        if self.figures and len(metrics):
            order = [self.structures[k] for k in self.structures]
            figs.structure_boxplots(
                {self.run_name: metrics}, self.out_dir / "boxplots.png", ("dsc", "asd_mm", "hd95_mm"), order
            )
        if self.figures and bins is not None:
            figs.calibration_plot({self.run_name: bins}, self.out_dir / "calibration.png")
        return _json_safe(summary)
