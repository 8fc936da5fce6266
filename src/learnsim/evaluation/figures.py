"""Evaluation figures (PNG): the per-pair output grid, per-structure box plots, calibration curves.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so they are
safe in headless jobs and do not disturb an interactive session that imports learnsim. Every file is written
atomically through :func:`learnsim.io.atomic_path`.

Slices are oriented from the affine (:func:`plane_views`): whatever the voxel order on disk (RAS, LPS, permuted),
axial and coronal views show the patient's left on the left and right on the right (neurological convention),
anterior (axial) or superior (coronal, sagittal) at the top, sagittal views anterior on the left; pixel aspect
follows the true spacing. Edge letters name the directions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from learnsim.io import atomic_path
from learnsim.spatial import displacement_to_mm

__all__ = ["PlaneView", "plane_views", "output_grid", "structure_boxplots", "calibration_plot"]

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
# plane -> (letters of its normal axis, letter at the bottom, letter at the right)
_PLANES = {
    "axial": ("SI", "P", "R"),
    "coronal": ("AP", "I", "R"),
    "sagittal": ("LR", "I", "P"),
}
_METRIC_LABELS = {"dsc": "DSC", "asd_mm": "ASD (mm)", "hd95_mm": "HD95 (mm)"}
_TARGET_LABELS = {
    "disagreement": "disagreement of warped segmentations\n(fraction of samples off the majority)",
    "error": "error rate of the mean transformation\n(warped vs fixed label differ)",
}


@dataclass(frozen=True)
class PlaneView:
    """How to cut and orient one mid-plane for display.

    ``normal``: voxel axis held fixed at ``index``; ``rows``/``cols``: voxel axes shown vertically/horizontally;
    ``flip_rows``/``flip_cols``: reverse them; ``aspect``: row spacing / column spacing (mm); ``edges``: the
    direction letters at (top, bottom, left, right).
    """

    name: str
    normal: int
    index: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    aspect: float
    edges: tuple[str, str, str, str]

    def cut(self, vol: np.ndarray) -> np.ndarray:
        """``[D, H, W]`` -> the oriented 2D slice ``[n_rows, n_cols]``."""
        s = np.take(vol, self.index, axis=self.normal)
        keep = [a for a in range(3) if a != self.normal]  # axis order left after np.take
        s = s if keep.index(self.rows) == 0 else s.T
        if self.flip_rows:
            s = s[::-1]
        if self.flip_cols:
            s = s[:, ::-1]
        return np.ascontiguousarray(s)


def plane_views(
    affine: Tensor | np.ndarray, shape: Sequence[int], center: Sequence[int] | None = None
) -> list[PlaneView]:
    """Axial, coronal and sagittal views through ``center`` (default the middle voxel) of a ``(D, H, W)`` grid."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
    codes = nib.orientations.aff2axcodes(
        a
    )  # direction each voxel axis increases towards, e.g. ('L', 'P', 'S')
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    center = [n // 2 for n in shape] if center is None else [int(c) for c in center]

    def axis_of(letters: str) -> int:
        return next(k for k, c in enumerate(codes) if c in letters)

    views = []
    for name, (normal_letters, bottom, right) in _PLANES.items():
        normal = axis_of(normal_letters)
        rows = axis_of(bottom + _OPPOSITE[bottom])
        cols = axis_of(right + _OPPOSITE[right])
        views.append(
            PlaneView(
                name=name,
                normal=normal,
                index=center[normal],
                rows=rows,
                cols=cols,
                flip_rows=codes[rows] != bottom,  # row index grows downwards, i.e. towards `bottom`
                flip_cols=codes[cols] != right,
                aspect=float(spacing[rows] / spacing[cols]),
                edges=(_OPPOSITE[bottom], bottom, _OPPOSITE[right], right),
            )
        )
    return views


def _np3(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"output_grid: {name} must be [D, H, W] or [1, 1, D, H, W]; got {np.shape(x)}")
    return arr


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def _robust_max(*arrays: np.ndarray, q: float = 99.5) -> float:
    vals = np.concatenate([a.ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    top = float(np.percentile(vals, q)) if vals.size else 1.0
    return top if top > 0 else max(float(vals.max(initial=0.0)), 1e-6)


def output_grid(
    path: str | os.PathLike,
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    warped: Tensor | np.ndarray,
    disp: Tensor,
    affine: Tensor | np.ndarray,
    uncertainty: Tensor | np.ndarray | None = None,
    mask: Tensor | np.ndarray | None = None,
    title: str | None = None,
    grid_step: int = 4,
    dpi: int = 110,
) -> Path:
    """The per-pair output grid: rows axial / coronal / sagittal mid-slices; columns fixed, moving, warped,
    ``|fixed - warped|``, the deformed grid, ``|u|`` (mm) and the uncertainty (mm) over the fixed image.

    Args:
        path: PNG to write.
        fixed, moving, warped: ``[D, H, W]`` or ``[1, 1, D, H, W]`` intensities (shown from 0 to the 99.5th
            percentile).
        disp: ``[1, 3, D, H, W]`` displacement in voxels (the posterior-mean transformation).
        affine: 4x4 voxel -> mm matrix of the fixed grid (orientation, aspect and mm conversion).
        uncertainty: ``[D, H, W]`` or ``[1, 1, D, H, W]`` displacement std in mm; column left blank when ``None``.
        mask: optional brain mask; the uncertainty overlay is drawn only inside it.
        title: figure title.
        grid_step: spacing of the drawn grid lines in voxels.
    The deformed grid shows ``phi = id + u`` applied to a regular grid of the fixed slice (in-plane components):
    where a line of the fixed grid lands in the moving image.
    """
    f, m, w = _np3(fixed, "fixed"), _np3(moving, "moving"), _np3(warped, "warped")
    if disp.dim() != 5 or disp.shape[:2] != (1, 3) or tuple(disp.shape[2:]) != f.shape:
        raise ValueError(
            f"output_grid: disp must be [1, 3, {', '.join(map(str, f.shape))}]; got {tuple(disp.shape)}"
        )
    aff = torch.as_tensor(
        np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
    )
    u_vox = disp.detach().float().cpu()
    mag = displacement_to_mm(u_vox, aff)[0].norm(dim=0).numpy()
    u_vox = u_vox[0].numpy()
    unc = _np3(uncertainty, "uncertainty") if uncertainty is not None else None
    msk = _np3(mask, "mask") > 0 if mask is not None else None
    diff = np.abs(f - w)
    views = plane_views(aff.numpy(), f.shape)

    columns = [
        "fixed",
        "moving",
        "warped",
        "|fixed - warped|",
        "deformed grid",
        "|u| (mm)",
        "uncertainty (mm)",
    ]
    vmax_img = {"fixed": _robust_max(f), "moving": _robust_max(m), "warped": _robust_max(w)}
    vmax_diff = _robust_max(diff)
    vmax_mag = _robust_max(mag, q=99.9)
    vmax_unc = (
        _robust_max(unc[msk] if (unc is not None and msk is not None and msk.any()) else unc, q=99.9)
        if unc is not None
        else 1.0
    )

    fig = Figure(figsize=(2.3 * len(columns), 2.4 * len(views) + 0.8), layout="constrained")
    # a thin last row holds one horizontal colour bar per quantitative column, so image rows stay aligned
    gs = fig.add_gridspec(len(views) + 1, len(columns), height_ratios=[1.0] * len(views) + [0.05])
    axes = np.array([[fig.add_subplot(gs[r, c]) for c in range(len(columns))] for r in range(len(views))])
    mappables: dict[int, object] = {}
    for r, view in enumerate(views):
        fs = view.cut(f)
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if name in vmax_img:
                src = {"fixed": f, "moving": m, "warped": w}[name]
                ax.imshow(
                    view.cut(src),
                    cmap="gray",
                    vmin=0.0,
                    vmax=vmax_img[name],
                    aspect=view.aspect,
                    interpolation="nearest",
                )
            elif name == "|fixed - warped|":
                mappables[c] = ax.imshow(
                    view.cut(diff),
                    cmap="magma",
                    vmin=0.0,
                    vmax=vmax_diff,
                    aspect=view.aspect,
                    interpolation="nearest",
                )
            elif name == "deformed grid":
                _draw_grid(ax, view, u_vox, grid_step)
            elif name == "|u| (mm)":
                mappables[c] = ax.imshow(
                    view.cut(mag),
                    cmap="viridis",
                    vmin=0.0,
                    vmax=vmax_mag,
                    aspect=view.aspect,
                    interpolation="nearest",
                )
            else:
                ax.imshow(
                    fs,
                    cmap="gray",
                    vmin=0.0,
                    vmax=vmax_img["fixed"],
                    aspect=view.aspect,
                    interpolation="nearest",
                )
                if unc is None:
                    ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color="w")
                else:
                    us = view.cut(unc)
                    hide = ~view.cut(msk) if msk is not None else np.zeros_like(us, dtype=bool)
                    mappables[c] = ax.imshow(
                        np.ma.masked_array(us, hide),
                        cmap="inferno",
                        vmin=0.0,
                        vmax=vmax_unc,
                        alpha=0.6,
                        aspect=view.aspect,
                        interpolation="nearest",
                    )
        axes[r, 0].set_ylabel(f"{view.name} ({'DHW'[view.normal]}={view.index})", fontsize=9)
        _edge_letters(axes[r, 0], view)
    for c in range(len(columns)):
        cax = fig.add_subplot(gs[len(views), c])
        if c in mappables:
            cb = fig.colorbar(mappables[c], cax=cax, orientation="horizontal")
            cb.ax.tick_params(labelsize=7)
            cb.ax.xaxis.set_major_locator(MaxNLocator(4))
        else:
            cax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def _edge_letters(ax, view: PlaneView) -> None:
    top, bottom, left, right = view.edges
    kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 7, "ha": "center", "va": "center"}
    ax.text(0.5, 0.96, top, **kw)
    ax.text(0.5, 0.04, bottom, **kw)
    ax.text(0.04, 0.5, left, **kw)
    ax.text(0.96, 0.5, right, **kw)


def _draw_grid(ax, view: PlaneView, u_vox: np.ndarray, step: int) -> None:
    """Lines of a regular grid on the slice, each point moved to ``x + u(x)`` (in-plane), in display coordinates."""
    shape = u_vox.shape[1:]
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    pos_rows = view.cut(idx[view.rows] + u_vox[view.rows])
    pos_cols = view.cut(idx[view.cols] + u_vox[view.cols])
    n_rows, n_cols = shape[view.rows], shape[view.cols]
    # the display flips the index axes; positions flip the same way
    if view.flip_rows:
        pos_rows = n_rows - 1 - pos_rows
    if view.flip_cols:
        pos_cols = n_cols - 1 - pos_cols
    kw = {"color": "k", "linewidth": 0.5}
    for i in range(0, n_rows, step):
        ax.plot(pos_cols[i, :], pos_rows[i, :], **kw)
    for j in range(0, n_cols, step):
        ax.plot(pos_cols[:, j], pos_rows[:, j], **kw)
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_aspect(view.aspect)
    ax.set_facecolor("white")


def _run_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def structure_boxplots(
    runs: Mapping[str, pd.DataFrame],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("dsc", "asd_mm"),
    structures: Sequence[str] | None = None,
    average_samples: bool = False,
    dpi: int = 110,
) -> Path:
    """Box plots per structure, runs side by side (one colour per run, legend), one panel per metric.

    Args:
        runs: run name -> metrics table with columns ``pair, sample, structure, <metric>...`` (metrics.csv).
        path: PNG to write.
        metrics: columns to plot (``dsc``, ``asd_mm``, ``hd95_mm``).
        structures: x-axis order; default the order of first appearance across runs.
        average_samples: one value per pair x structure (mean over samples) instead of one per pair x sample x
            structure.
    NaNs (absent structures) are left out of each box.
    """
    if not runs:
        raise ValueError("structure_boxplots: no run given")
    tables = {}
    for name, df in runs.items():
        if average_samples:
            df = df.groupby(["pair", "structure"], sort=False, as_index=False)[list(metrics)].mean()
        tables[name] = df
    if structures is None:
        structures = list(dict.fromkeys(s for df in tables.values() for s in df["structure"].astype(str)))
    n_runs = len(tables)
    colours = _run_colours(n_runs)
    width = 0.8 / n_runs
    fig = Figure(
        figsize=(max(6.0, 0.55 * len(structures) * max(1.0, n_runs / 2) + 2), 3.2 * len(metrics)),
        layout="constrained",
    )
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    x = np.arange(len(structures))
    for ax, metric in zip(axes, metrics, strict=True):
        for k, (name, df) in enumerate(tables.items()):
            groups = df.groupby(df["structure"].astype(str))[metric]
            data = []
            for s in structures:
                vals = groups.get_group(s).to_numpy(dtype=float) if s in groups.groups else np.array([])
                data.append(vals[np.isfinite(vals)])
            pos = x - 0.4 + width * (k + 0.5)
            keep = [i for i, d in enumerate(data) if d.size]
            if keep:
                bp = ax.boxplot(
                    [data[i] for i in keep],
                    positions=pos[keep],
                    widths=width * 0.85,
                    patch_artist=True,
                    manage_ticks=False,
                    flierprops={"markersize": 2, "markeredgecolor": colours[k]},
                    medianprops={"color": "k", "linewidth": 1},
                )
                for box in bp["boxes"]:
                    box.set_facecolor(colours[k])
                    box.set_alpha(0.75)
            ax.plot([], [], "s", color=colours[k], label=name)  # legend handle even when a run has no data
        ax.set_xticks(x)
        ax.set_xticklabels(structures, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.6, len(structures) - 0.4)
        if metric == "dsc":
            ax.set_ylim(top=1.01)  # autoscaled bottom: differences near DSC 0.8-0.9 stay visible
    axes[0].legend(loc="best", fontsize=8, ncols=min(n_runs, 4))
    return _save(fig, path, dpi)


def calibration_plot(
    runs: Mapping[str, pd.DataFrame],
    path: str | os.PathLike,
    targets: Sequence[str] = ("disagreement", "error"),
    dpi: int = 110,
) -> Path:
    """Binned uncertainty (x, mm) vs each target's mean per bin (y), one line per run, one panel per target.

    Args:
        runs: run name -> calibration bins (columns ``u_mean`` and ``<target>_mean``, see
            :func:`learnsim.evaluation.uncertainty.calibration_bins`).
        path: PNG to write.
    """
    if not runs:
        raise ValueError("calibration_plot: no run given")
    colours = _run_colours(len(runs))
    fig = Figure(figsize=(4.6 * len(targets), 3.6), layout="constrained")
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, target in zip(axes, targets, strict=True):
        col = f"{target}_mean"
        for k, (name, bins) in enumerate(runs.items()):
            if bins is None or col not in bins or bins.empty:
                continue
            ax.plot(bins["u_mean"], bins[col], "o-", color=colours[k], label=name, markersize=4)
        ax.set_xlabel("uncertainty, bin mean (mm)")
        ax.set_ylabel(_TARGET_LABELS.get(target, target), fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path, dpi)
