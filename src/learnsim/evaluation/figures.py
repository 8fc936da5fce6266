"""Evaluation figures (PNG): the per-pair output grid, the label-contour overlay, per-structure box plots,
calibration curves.

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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from learnsim.grid import affine_to_numpy, affine_to_tensor
from learnsim.io import atomic_path
from learnsim.spatial import displacement_to_mm

__all__ = [
    "PlaneView",
    "plane_views",
    "output_grid",
    "label_overlay",
    "label_overlay_size",
    "structure_colours",
    "structure_boxplots",
    "calibration_plot",
    "metric_figure",
    "metric_figure_from_data",
]

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
    a = affine_to_numpy(affine)
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


_OUTPUT_COLUMNS = (
    "fixed",
    "moving",
    "warped",
    "|fixed - warped|",
    "deformed grid",
    "|u| (mm)",
    "uncertainty (mm)",
)


@dataclass(frozen=True)
class _OutputImages:
    """What the output grid shows, as ``[D, H, W]`` arrays, with each column's display maximum."""

    images: dict[str, np.ndarray]  # "fixed", "moving", "warped"
    diff: np.ndarray  # |fixed - warped|
    mag: np.ndarray  # |u| in mm
    u_vox: np.ndarray  # [3, D, H, W] displacement in voxels
    unc: np.ndarray | None  # displacement std in mm
    msk: np.ndarray | None  # bool brain mask
    vmax: dict[str, float]  # per image name, and "diff", "mag", "unc"


def _output_images(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    warped: Tensor | np.ndarray,
    disp: Tensor,
    aff: Tensor,
    uncertainty: Tensor | np.ndarray | None,
    mask: Tensor | np.ndarray | None,
) -> _OutputImages:
    f, m, w = _np3(fixed, "fixed"), _np3(moving, "moving"), _np3(warped, "warped")
    if disp.dim() != 5 or disp.shape[:2] != (1, 3) or tuple(disp.shape[2:]) != f.shape:
        raise ValueError(
            f"output_grid: disp must be [1, 3, {', '.join(map(str, f.shape))}]; got {tuple(disp.shape)}"
        )
    u_vox = disp.detach().float().cpu()
    mag = displacement_to_mm(u_vox, aff)[0].norm(dim=0).numpy()
    unc = _np3(uncertainty, "uncertainty") if uncertainty is not None else None
    msk = _np3(mask, "mask") > 0 if mask is not None else None
    diff = np.abs(f - w)
    vmax = {"fixed": _robust_max(f), "moving": _robust_max(m), "warped": _robust_max(w)}
    vmax["diff"] = _robust_max(diff)
    vmax["mag"] = _robust_max(mag, q=99.9)
    # the uncertainty's range inside the brain: outside it the posterior is the prior's extrapolation
    vmax["unc"] = (
        _robust_max(unc[msk] if (unc is not None and msk is not None and msk.any()) else unc, q=99.9)
        if unc is not None
        else 1.0
    )
    return _OutputImages({"fixed": f, "moving": m, "warped": w}, diff, mag, u_vox[0].numpy(), unc, msk, vmax)


def _show(ax, view: PlaneView, image: np.ndarray, **kw):
    """``imshow`` of an already cut slice with the view's pixel aspect, no interpolation."""
    return ax.imshow(image, aspect=view.aspect, interpolation="nearest", **kw)


def _output_panel(ax, name: str, view: PlaneView, im: _OutputImages, grid_step: int):
    """Draw column ``name`` of the output grid for one view; returns the image that gets a colour bar, or None."""
    if name in im.images:
        _show(ax, view, view.cut(im.images[name]), cmap="gray", vmin=0.0, vmax=im.vmax[name])
        return None
    if name == "|fixed - warped|":
        return _show(ax, view, view.cut(im.diff), cmap="magma", vmin=0.0, vmax=im.vmax["diff"])
    if name == "deformed grid":
        _draw_grid(ax, view, im.u_vox, grid_step)
        return None
    if name == "|u| (mm)":
        return _show(ax, view, view.cut(im.mag), cmap="viridis", vmin=0.0, vmax=im.vmax["mag"])
    # the uncertainty, over the fixed image
    _show(ax, view, view.cut(im.images["fixed"]), cmap="gray", vmin=0.0, vmax=im.vmax["fixed"])
    if im.unc is None:
        ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color="w")
        return None
    us = view.cut(im.unc)
    hide = ~view.cut(im.msk) if im.msk is not None else np.zeros_like(us, dtype=bool)
    return _show(
        ax, view, np.ma.masked_array(us, hide), cmap="inferno", vmin=0.0, vmax=im.vmax["unc"], alpha=0.6
    )


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
    aff = affine_to_tensor(affine)
    im = _output_images(fixed, moving, warped, disp, aff, uncertainty, mask)
    views = plane_views(aff.numpy(), im.images["fixed"].shape)
    columns = _OUTPUT_COLUMNS

    fig = Figure(figsize=(2.3 * len(columns), 2.4 * len(views) + 0.8), layout="constrained")
    # a thin last row holds one horizontal colour bar per quantitative column, so image rows stay aligned
    gs = fig.add_gridspec(len(views) + 1, len(columns), height_ratios=[1.0] * len(views) + [0.05])
    axes = np.array([[fig.add_subplot(gs[r, c]) for c in range(len(columns))] for r in range(len(views))])
    mappables: dict[int, object] = {}
    for r, view in enumerate(views):
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if (shown := _output_panel(ax, name, view, im, grid_step)) is not None:
                mappables[c] = shown
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


# tab20 without its two greys (a grey contour would vanish on the grey image): dark shades first, then light
_STRUCTURE_PALETTE = [0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19]


def structure_colours(labels: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """One distinct RGB colour (floats in [0, 1]) per label, in the given order (wraps after 18 labels)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {
        int(label): tuple(float(c) for c in cmap(_STRUCTURE_PALETTE[k % len(_STRUCTURE_PALETTE)])[:3])
        for k, label in enumerate(labels)
    }


_OVERLAY_LEGEND_IN = 1.7  # inches to the right of the panels for the structure legend
_OVERLAY_TITLE_IN = 0.5  # inches above the panels for the figure and column titles
_OVERLAY_LEFT_IN = 0.25  # inches left of the panels for the row names


def label_overlay_size(
    n_columns: int, panel_size: float = 2.4, legend: bool = True, dpi: int = 110
) -> tuple[int, int]:
    """``(width, height)`` in pixels of a :func:`label_overlay` PNG with ``n_columns`` columns: the figure is
    ``0.25 + panel_size * n_columns (+ 1.7 legend)`` by ``panel_size * 3 + 0.5`` inches, times ``dpi``."""
    w = _OVERLAY_LEFT_IN + panel_size * n_columns + (_OVERLAY_LEGEND_IN if legend else 0.0)
    h = panel_size * 3 + _OVERLAY_TITLE_IN
    return round(w * dpi), round(h * dpi)


def _labels_np(x: Tensor | np.ndarray | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if x is None:
        return None
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != shape:
        raise ValueError(
            f"label_overlay: {name} must be [D, H, W] or [1, 1, D, H, W] on the fixed grid {shape}; "
            f"got {np.shape(x)}"
        )
    return np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64)


def _mean_dsc(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> float:
    """Mean DSC over the labels present in ``b`` (the reference); NaN when none is."""
    scores = []
    for label in labels:
        ref = b == label
        n_ref = int(ref.sum())
        if n_ref:
            pred = a == label
            scores.append(2.0 * int((pred & ref).sum()) / (int(pred.sum()) + n_ref))
    return float(np.mean(scores)) if scores else float("nan")


def _overlay_center(base: np.ndarray, labels: Sequence[int]) -> list[int]:
    """The centre voxel of the outlined structures in ``base``, or the grid centre when none is present."""
    inside = np.isin(base, labels)
    return [int(round(c)) for c in np.argwhere(inside).mean(axis=0)] if inside.any() else [n // 2 for n in base.shape]


def _crop_windows(
    segs: Sequence[np.ndarray],
    present: Sequence[int],
    crop_mm: float | None,
    spacing: np.ndarray,
    views: Sequence[PlaneView],
) -> list[tuple[float, float, float, float] | None]:
    """Per view, the display window ``(x0, x1, y0, y1)`` (displayed pixel indices) of the box around the
    structures in any of ``segs``, grown by ``crop_mm`` (``spacing``: mm per voxel axis); ``None`` (whole
    slices) without ``crop_mm`` or structures."""
    if crop_mm is None or not present:
        return [None] * len(views)
    shape = segs[0].shape
    union = np.zeros(shape, dtype=bool)
    for seg in segs:
        union |= np.isin(seg, present)
    lo, hi = np.argwhere(union).min(axis=0), np.argwhere(union).max(axis=0)
    margin = np.ceil(float(crop_mm) / spacing).astype(int)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, np.asarray(shape) - 1)
    windows = []
    for view in views:
        rows = (lo[view.rows], hi[view.rows])
        cols = (lo[view.cols], hi[view.cols])
        if view.flip_rows:
            rows = (shape[view.rows] - 1 - rows[1], shape[view.rows] - 1 - rows[0])
        if view.flip_cols:
            cols = (shape[view.cols] - 1 - cols[1], shape[view.cols] - 1 - cols[0])
        windows.append((cols[0] - 0.5, cols[1] + 0.5, rows[1] + 0.5, rows[0] - 0.5))
    return windows


def _outline(ax, cut: np.ndarray, present: Sequence[int], colour_of, linewidths: float = 1.0,
             linestyles: str = "solid", antialiased: bool = True) -> None:
    """The outline of each structure present in the slice ``cut`` (its 0.5 iso-line, in voxel coordinates: x =
    column, y = row), all drawn as one line collection; ``colour_of(label)`` -> its colour.

    The lines are what ``ax.contour(cut == label, levels=[0.5])`` draws (the same contourpy algorithm and corner
    masking as matplotlib's defaults), without a ContourSet per structure: ~35 ms of matplotlib bookkeeping each,
    which made this figure the slowest output of learnsim-register.
    """
    import contourpy
    from matplotlib import rcParams
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    segments, colours = [], []
    for label in present:
        m = cut == label
        if not m.any():
            continue
        gen = contourpy.contour_generator(z=m.astype(np.float64), name=rcParams["contour.algorithm"],
                                          corner_mask=rcParams["contour.corner_mask"],
                                          line_type=contourpy.LineType.SeparateCode)
        lines = [ln for ln in gen.lines(0.5)[0] if len(ln) > 1]  # (points, codes): a closed line repeats its start
        segments += lines
        colours += [to_rgba(colour_of(label))] * len(lines)
    if segments:
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=linewidths, linestyles=linestyles,
                                         antialiased=antialiased), autolim=False)


@dataclass(frozen=True)
class _OverlayStyle:
    present: list[int]  # structures outlined, in legend order
    colours: dict[int, tuple[float, float, float]]
    vmax: float  # grey window of the fixed image
    linewidth: float
    reference_outlines: bool


def _overlay_panel(
    ax,
    view: PlaneView,
    f: np.ndarray,
    seg: np.ndarray,
    ref: np.ndarray | None,
    style: _OverlayStyle,
    window: tuple[float, float, float, float] | None,
) -> None:
    """The fixed slice in grey, ``seg``'s outlines in colour, the atlas outlines dashed white (unless ``seg`` is
    the atlas' own labels), zoomed to ``window``."""
    ax.set_xticks([])
    ax.set_yticks([])
    img = view.cut(f)
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=style.vmax, aspect=view.aspect, interpolation="nearest")
    _outline(ax, view.cut(seg), style.present, lambda k: style.colours[k], linewidths=style.linewidth, antialiased=True)
    if style.reference_outlines and ref is not None and seg is not ref:
        _outline(ax, view.cut(ref), style.present, lambda k: "white", linewidths=0.6, linestyles="dashed")
    x0, x1, y0, y1 = window or (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect(view.aspect)


def _overlay_figure(n_columns: int, n_views: int, panel_size: float, legend: bool, dpi: int):
    """``(figure, gridspec, right edge of the panels as a figure fraction)``; panels on a fixed grid (in figure
    fractions) so the PNG's size never depends on the content."""
    width_px, height_px = label_overlay_size(n_columns, panel_size, legend, dpi)
    fig = Figure(figsize=(width_px / dpi, height_px / dpi))
    left_frac = _OVERLAY_LEFT_IN / (width_px / dpi)
    right_frac = (_OVERLAY_LEFT_IN + panel_size * n_columns) / (width_px / dpi)
    top_frac = 1.0 - _OVERLAY_TITLE_IN / (height_px / dpi)
    gs = fig.add_gridspec(
        n_views, n_columns, left=left_frac, right=right_frac - 0.005, bottom=0.005, top=top_frac,
        wspace=0.03, hspace=0.03,
    )
    return fig, gs, right_frac


def _overlay_legend(fig, names: Mapping[int, str], style: _OverlayStyle, dashed: bool, right_frac: float) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style.colours[k], linewidth=2.0, label=names[k]) for k in style.present]
    if dashed:
        handles.append(Line2D([], [], color="0.6", linewidth=1.0, linestyle="--", label="atlas outline"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(right_frac, 0.5), fontsize=7, frameon=False)


def label_overlay(
    path: str | os.PathLike,
    fixed: Tensor | np.ndarray,
    warped_seg: Tensor | np.ndarray,
    affine: Tensor | np.ndarray,
    fixed_seg: Tensor | np.ndarray | None = None,
    moving_seg: Tensor | np.ndarray | None = None,
    structures: Mapping[int, str] | None = None,
    title: str | None = None,
    center: Sequence[int] | None = None,
    reference_outlines: bool = True,
    crop_mm: float | None = 20.0,
    legend: bool = True,
    panel_size: float = 2.4,
    linewidth: float = 1.3,
    dpi: int = 110,
) -> Path:
    """The label-transfer figure: structure outlines on the fixed image, rows axial / coronal / sagittal.

    Columns: ``atlas labels`` (the fixed segmentation's own outlines; with ``fixed_seg``), ``before`` (the moving
    segmentation on the fixed grid, i.e. the affine-only start; with ``moving_seg``) and ``after`` (the warped
    segmentation). Each structure has one colour (:func:`structure_colours`, in the order of ``structures``) in
    every panel; with ``reference_outlines`` the atlas outlines are repeated as thin white dashed lines in the
    before / after panels, so the mismatch is seen in place. Column titles give the mean DSC against
    ``fixed_seg`` over the structures it labels (and, with ``moving_seg``, the moving segmentation labels too).

    Args:
        path: PNG to write; its size in pixels is :func:`label_overlay_size` of the number of columns.
        fixed: ``[D, H, W]`` or ``[1, 1, D, H, W]`` fixed intensities (grey, 0 to the 99.5th percentile).
        warped_seg: integer label map on the fixed grid, same shape (the moving segmentation warped, nearest).
        affine: 4x4 voxel -> mm matrix of the fixed grid (orientation and pixel aspect, see :func:`plane_views`).
        fixed_seg, moving_seg: optional label maps on the fixed grid, same shape.
        structures: label id -> name of the structures to outline (default
            :data:`learnsim.evaluation.metrics.STRUCTURES`); other labels are ignored.
        center: voxel ``(d, h, w)`` the three planes pass through; default the centre of the outlined structures
            in ``fixed_seg`` (else ``warped_seg``), or the grid centre when none is present.
        crop_mm: zoom every panel to the box around the outlined structures (all columns) plus this margin in mm;
            ``None`` shows whole slices.
        legend: a legend of the structures present, right of the panels.
        panel_size: inches per panel; linewidth: contour width in points.
    """
    from learnsim.evaluation.metrics import STRUCTURES

    f = _np3(fixed, "fixed")
    warped, ref, before = (
        _labels_np(x, n, f.shape) for x, n in ((warped_seg, "warped_seg"), (fixed_seg, "fixed_seg"), (moving_seg, "moving_seg"))
    )
    names = dict(STRUCTURES if structures is None else structures)
    labels = list(names)
    if center is None:
        center = _overlay_center(ref if ref is not None else warped, labels)
    aff = affine_to_numpy(affine)
    views = plane_views(aff, f.shape, center)

    named = (("atlas labels", ref), ("before (affine only)", before), ("after (registered)", warped))
    columns = [(n, seg) for n, seg in named if seg is not None]  # the atlas' and the moving labels when given
    present = [k for k in labels if any((seg == k).any() for _, seg in columns)]
    style = _OverlayStyle(present, structure_colours(labels), _robust_max(f), linewidth, reference_outlines)
    windows = _crop_windows([seg for _, seg in columns], present, crop_mm, np.linalg.norm(aff[:3, :3], axis=0), views)

    fig, gs, right_frac = _overlay_figure(len(columns), len(views), panel_size, legend, dpi)
    # DSC over the structures the moving segmentation labels at all (as the evaluator: others were never registrable)
    scored = [k for k in labels if (before == k).any()] if before is not None else labels
    for c, (name, seg) in enumerate(columns):
        col_title = name
        if ref is not None and seg is not ref:
            col_title += f"\nmean DSC {_mean_dsc(seg, ref, scored):.3f}"
        for r, view in enumerate(views):
            ax = fig.add_subplot(gs[r, c])
            _overlay_panel(ax, view, f, seg, ref, style, windows[r])
            if r == 0:
                ax.set_title(col_title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{view.name} ({'DHW'[view.normal]}={view.index})", fontsize=8)
                _edge_letters(ax, view)
    if legend and present:
        _overlay_legend(fig, names, style, reference_outlines and ref is not None and len(columns) > 1, right_frac)
    if title:
        fig.suptitle(title, fontsize=9, y=0.995)
    return _save(fig, path, dpi)


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


def _metric_panel(ax, view: PlaneView, vol: np.ndarray, title: str, **kw) -> None:
    ax.imshow(view.cut(vol), aspect=view.aspect, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def metric_figure(
    atlas: Tensor, mask: Tensor, moving: Tensor, affine: Tensor | np.ndarray, metrics: Mapping[str, object],
    path: str | os.PathLike, dpi: int = 110,
) -> Path:
    """What a learnt metric learnt, one axial slice per panel: top row the atlas and each metric's features of it
    ``c a(F)`` (the same grey window as the atlas: a normalised metric keeps the atlas' RMS); bottom row the
    moving image and each metric's voxel-wise energy of the pair (:meth:`SimilarityMetric.energy_map`; its own
    colour window, the sum over the mask in the title).

    Args:
        atlas, mask, moving: ``[1, 1, D, H, W]`` on the working grid (intensities in [0, 1]).
        affine: the grid's voxel-to-mm affine (orients the slice).
        metrics: name -> :class:`~learnsim.metric.SimilarityMetric` (baselines and learnt ones), in column order.
        path: the PNG to write.
    """
    view = plane_views(affine, atlas.shape[2:])[0]
    n = 1 + len(metrics)
    fig = Figure(figsize=(2.2 * n, 4.6))
    axes = fig.subplots(2, n, squeeze=False)
    window = dict(cmap="gray", vmin=0.0, vmax=_robust_max(_np3(atlas, "atlas")))
    _metric_panel(axes[0, 0], view, _np3(atlas, "atlas"), "atlas F", **window)
    _metric_panel(axes[1, 0], view, _np3(moving, "moving"), "moving M (before registration)", **window)
    for k, (name, metric) in enumerate(metrics.items(), start=1):
        feats = _np3(metric.features(atlas).detach(), "features")
        _metric_panel(axes[0, k], view, feats, f"{name}: features of F", **window)
        energy = _np3(metric.energy_map(atlas, moving, mask), "energy")
        sign = -1.0 if energy.sum() < 0 else 1.0  # LCC's energy is negative: show -E (bright = similar)
        shown = sign * energy
        hi = max(float(np.percentile(shown, 99.5)), 1e-9)
        label = "-energy" if sign < 0 else "energy"
        _metric_panel(axes[1, k], view, shown, f"{name}: {label} (sum {energy.sum():.4g})", cmap="magma", vmin=0.0,
                      vmax=hi)
    fig.tight_layout()
    return _save(fig, path, dpi)


def metric_figure_from_data(data_dir: str | os.PathLike, metrics: Mapping[str, str], path: str | os.PathLike,
                            dims: int = 48, pair: int = 0, intensity: str = "histmatch") -> Path:
    """:func:`metric_figure` for test pair ``pair`` of a cohort folder (``test.csv``), on a ``dims`` grid.

    Args:
        metrics: name -> a checkpoint (``*.ckpt``: its learnt metric) or ``"ssd:W"`` / ``"lcc:W"`` (a baseline of
            likelihood precision ``W``).
    """
    from learnsim.data.datamodule import PairDataModule
    from learnsim.metric import SimilarityMetric, build_metric

    dm = PairDataModule(None, test_csv=Path(data_dir) / "test.csv", dims=dims, intensity=intensity)
    dm.setup("test")
    batch = next(b for i, b in enumerate(dm.test_dataloader()) if i == pair)
    built = {}
    for name, spec in metrics.items():
        if spec.endswith(".ckpt"):
            built[name] = SimilarityMetric.from_checkpoint(spec)
        else:
            kind, _, weight = spec.partition(":")
            built[name] = build_metric(kind, weight=float(weight or 1.0))
    return metric_figure(batch["fixed"], batch["fixed_mask"], batch["moving"], batch["affine"][0], built, path)
