"""Preprocessing: ONE implementation, used by the cohort builders (demo, UK Biobank) and by the dataset at run time.

The target grid is defined by the atlas (fixed image), as in the original code:

1. reorient to RAS (closest canonical: axis permutations/flips only, no resampling of the grid lines),
2. zero-pad to a cube, centred (``pad_before = (N - n) // 2``),
3. resize to ``dims`` keeping the field of view: the new voxel size is ``N / dims`` and voxel ``i`` of the new
   grid sits at cube coordinate ``(i + 0.5) * N / dims - 0.5``.

Steps 1-3 only define a :class:`learnsim.grid.Grid` (shape + voxel->mm affine). Every volume, the atlas included, is then
resampled into that grid **through world coordinates**: target voxel -> mm (target affine) -> source voxel
(inverse source affine). Volumes with another shape, spacing or orientation in the same world (MNI) space
therefore land in the right place. Images are sampled trilinearly, masks and label maps by nearest neighbour;
outside the source field of view is 0. Images are masked (where a mask is given) and min-max scaled to [0, 1].

Sampling uses :func:`torch.nn.functional.grid_sample` with the coordinate order of :mod:`learnsim.spatial`
(channel ``c`` of a coordinate field indexes tensor axis ``2 + c``; grid_sample's ``(x, y, z)`` is the reverse);
see :func:`sample_at_voxels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim import spatial
from learnsim.grid import Grid, as_dims
from learnsim.io import load_nifti

__all__ = [
    "Grid",
    "Volume",
    "Preprocessed",
    "match_histogram",
    "as_dims",
    "canonical_grid",
    "cube_grid",
    "resize_grid",
    "target_grid",
    "source_voxel_coords",
    "sample_at_voxels",
    "resample_to_grid",
    "resampling_note",
    "minmax",
    "preprocess",
]

# Grid and as_dims live in learnsim.grid (the core); re-exported here for the data layer's callers.


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> Grid:
    """The same voxels, axes permuted/flipped to the closest RAS+ orientation (like ``nib.as_closest_canonical``)."""
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    new_shape = tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))
    # inv_ornt_aff maps voxel indices of the reoriented array to indices of the original one
    return Grid(new_shape, affine @ nib.orientations.inv_ornt_aff(ornt, shape))


def cube_grid(grid: Grid) -> Grid:
    """Zero-pad ``grid`` to a cube of side ``max(shape)``, centred (``pad_before = (N - n) // 2``)."""
    n = max(grid.shape)
    shift = np.eye(4)
    shift[:3, 3] = [-((n - s) // 2) for s in grid.shape]
    return Grid((n, n, n), grid.affine @ shift)


def resize_grid(grid: Grid, dims: int | Sequence[int]) -> Grid:
    """Same field of view, ``dims`` voxels: voxel ``i`` sits at old coordinate ``(i + 0.5) * n / d - 0.5``."""
    dims = as_dims(dims)
    scale = np.array([n / d for n, d in zip(grid.shape, dims, strict=True)])
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * (scale - 1.0)
    return Grid(dims, grid.affine @ m)


def target_grid(shape: Sequence[int], affine: np.ndarray, dims: int | Sequence[int]) -> Grid:
    """The working grid defined by an atlas of ``shape``/``affine``: RAS, centred cube, ``dims`` voxels."""
    return resize_grid(cube_grid(canonical_grid(shape, affine)), dims)


def source_voxel_coords(
    grid: Grid, src_affine: np.ndarray, disp: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """For every voxel of ``grid``, the (fractional) voxel index in a source volume with ``src_affine``.

    ``x_src = A_src^{-1} A_grid (x + u(x))``: computed in float64, returned as ``[1, 3, D, H, W]`` with channel
    ``c`` indexing source array axis ``c`` (learnsim.spatial's convention). ``disp`` (``[1, 3, D, H, W]``, voxels of
    ``grid``, optional) is a pull-back displacement as in :func:`learnsim.spatial.warp`: resampling with it equals
    resampling into ``grid`` and then warping by ``id + disp``, with a single interpolation from the source.
    """
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ grid.affine
    ident = spatial.identity_grid(grid.shape, dtype=torch.float64)  # [1, 3, D, H, W]
    if disp is not None:
        if tuple(disp.shape) != (1, 3, *grid.shape):
            raise ValueError(
                f"source_voxel_coords: disp must be [1, 3, {grid.shape}]; got {tuple(disp.shape)}"
            )
        ident = ident + disp.detach().to(torch.float64)
    lin = torch.from_numpy(m[:3, :3])
    coords = torch.einsum("ij,bjdhw->bidhw", lin, ident) + torch.from_numpy(m[:3, 3]).view(1, 3, 1, 1, 1)
    return coords.to(dtype)


def sample_at_voxels(
    volume: Tensor, coords: Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> Tensor:
    """Sample ``volume`` at arbitrary voxel coordinates (the source grid may differ from the output grid).

    Args:
        volume: ``[B, C, d, h, w]`` source.
        coords: ``[B, 3, D, H, W]`` voxel indices into ``volume``, channel ``c`` along tensor axis ``2 + c``.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: grid_sample padding; ``"zeros"`` = 0 outside the source field of view.
    Returns:
        ``[B, C, D, H, W]``.

    Uses the conversion of :func:`learnsim.spatial.to_sampling_grid` (channel order (D, H, W) -> grid_sample's
    (x, y, z) = (W, H, D), ``align_corners=True``), normalised by the *source* grid size instead of the output
    one; for equal grids it equals ``spatial.warp(volume, coords - identity)`` (tested).
    """
    if volume.dim() != 5 or coords.dim() != 5 or coords.shape[1] != 3:
        raise ValueError(
            f"sample_at_voxels: need volume [B,C,d,h,w] and coords [B,3,D,H,W]; got {tuple(volume.shape)}, {tuple(coords.shape)}"
        )
    d, h, w = volume.shape[2:]
    scale = torch.tensor(
        [2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1), 2.0 / max(d - 1, 1)],
        dtype=coords.dtype,
        device=coords.device,
    )
    grid = coords.permute(0, 2, 3, 4, 1).flip(-1) * scale - 1.0
    vol = volume.to(coords.dtype) if volume.dtype != coords.dtype else volume
    return F.grid_sample(vol, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    grid: Grid,
    kind: str = "image",
    disp: Tensor | None = None,
    coords: Tensor | None = None,
) -> np.ndarray:
    """Resample a 3D array with voxel->mm ``affine`` into ``grid`` through world coordinates.

    Args:
        array: ``[d, h, w]`` source values.
        affine: 4x4 voxel->mm of ``array``.
        grid: target grid.
        kind: ``"image"`` (trilinear, float32 out), ``"mask"`` (nearest, >0.5 -> uint8 0/1) or ``"labels"``
            (nearest, rounded -> int16, int32 for ids beyond it).
        disp: optional pull-back displacement ``[1, 3, D, H, W]`` in voxels of ``grid`` (see
            :func:`source_voxel_coords`).
        coords: the result of ``source_voxel_coords(grid, affine, disp)`` if already at hand (volumes sharing an
            affine reuse it).
    Returns:
        ``grid.shape`` array; 0 outside the source field of view. If the source already is on ``grid`` the data are
        copied, not interpolated.
    """
    if kind not in ("image", "mask", "labels"):
        raise ValueError(f"resample_to_grid: kind must be image, mask or labels; got {kind!r}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"resample_to_grid: need a 3D array; got shape {array.shape}")
    if disp is None and coords is None and grid.matches(array.shape, affine):
        out = array.astype(np.float32)
    else:
        src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        if coords is None:
            coords = source_voxel_coords(grid, affine, disp)
        mode = "bilinear" if kind == "image" else "nearest"
        out = sample_at_voxels(src, coords, mode=mode)[0, 0].numpy()
    if kind == "mask":
        return (out > 0.5).astype(np.uint8)
    if kind == "labels":
        ids = np.rint(out)
        fits = ids.size == 0 or (ids.min() >= np.iinfo(np.int16).min and ids.max() <= np.iinfo(np.int16).max)
        return ids.astype(np.int16 if fits else np.int32)  # ids >= 32768 would wrap around in int16
    return out.astype(np.float32, copy=False)


def resampling_note(shape: Sequence[int], affine: np.ndarray, grid: Grid, name: str = "volume") -> str | None:
    """A one-line description if a volume is not on ``grid`` (so it gets resampled), else ``None``."""
    if grid.matches(shape, affine):
        return None
    src = Grid(tuple(shape), affine)
    return f"{name}: resampled {tuple(src.shape)} {src.spacing.round(3).tolist()} mm {src.orientation} -> {grid!r}"


def match_histogram(
    image: np.ndarray,
    mask: np.ndarray | None,
    reference: np.ndarray,
    reference_mask: np.ndarray | None,
    n_quantiles: int = 256,
) -> np.ndarray:
    """Map ``image``'s intensities inside ``mask`` onto the distribution of ``reference`` inside ``reference_mask``.

    Piecewise-linear quantile matching (``n_quantiles`` + 1 knots): the voxel at quantile q of the image gets the
    reference's quantile q. Monotone, so anatomy is untouched; it removes global contrast differences (scanner,
    gamma, another template's contrast) that SSD would otherwise "explain" by deforming (ANTs does the same before
    MSQ/SSD). Masks default to the non-zero voxels; outside ``mask`` the result is 0. float32, same shape.

    Raises:
        ValueError: if either mask selects no voxel.
    """
    x = np.asarray(image, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    inside = (np.asarray(mask) > 0) if mask is not None else x != 0
    ref_inside = (np.asarray(reference_mask) > 0) if reference_mask is not None else ref != 0
    if not inside.any() or not ref_inside.any():
        raise ValueError("match_histogram: empty mask (no voxel to match)")
    q = np.linspace(0.0, 1.0, int(n_quantiles) + 1)
    src = np.quantile(x[inside], q)
    dst = np.quantile(ref[ref_inside], q)
    # np.interp needs increasing knots: keep the first of repeated source quantiles (flat histograms, e.g. a
    # background plateau inside the mask)
    keep = np.concatenate([[True], np.diff(src) > 0])
    out = np.interp(x, src[keep], dst[keep]).astype(np.float32)
    return np.where(inside, out, np.float32(0.0))


def minmax(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Min-max scale to [0, 1]; with a mask, over the masked voxels, and 0 outside it. float32."""
    x = np.asarray(image, dtype=np.float32)
    if mask is not None:
        inside = np.asarray(mask) > 0
        if not inside.any():
            return np.zeros_like(x)
        lo, hi = float(x[inside].min()), float(x[inside].max())
        x = np.where(inside, x, lo)
    else:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return ((x - lo) / (hi - lo)).astype(np.float32)


@dataclass
class Volume:
    """A 3D array with its voxel->mm affine and a name for messages (``Volume.load(path)`` reads a NIfTI)."""

    data: np.ndarray
    affine: np.ndarray
    name: str = "volume"

    @classmethod
    def load(cls, path: str | os.PathLike) -> Volume:
        data, affine = load_nifti(path)
        return cls(data, affine, str(path))

    @property
    def grid(self) -> Grid:
        return Grid(self.data.shape, self.affine)


@dataclass
class Preprocessed:
    """One subject on the target grid: image float32 in [0, 1], mask uint8 0/1 or None, labels int16 (int32 for ids >= 32768) or None."""

    image: np.ndarray
    mask: np.ndarray | None
    seg: np.ndarray | None
    grid: Grid
    notes: list[str] = field(default_factory=list)


def preprocess(
    image: Volume,
    grid: Grid,
    mask: Volume | None = None,
    seg: Volume | None = None,
    apply_mask: bool = True,
    disp: Tensor | None = None,
) -> Preprocessed:
    """Bring one subject onto ``grid``: image trilinear, mask/seg nearest, mask applied, min-max to [0, 1].

    The image is multiplied by the mask (``apply_mask``; the original data were brain-extracted, and masking an
    already extracted image changes nothing) and then min-max scaled over the mask (0 outside). ``notes`` lists
    which inputs had to be resampled (see :func:`resampling_note`). ``disp`` (optional, voxels of ``grid``) warps
    all three in the same single interpolation (used to make the demo pseudo-subjects).
    """
    notes = [
        n
        for v in (image, mask, seg)
        if v is not None and (n := resampling_note(v.data.shape, v.affine, grid, v.name))
    ]
    cache: dict[bytes, Tensor] = {}

    def run(v: Volume, kind: str) -> np.ndarray:
        if disp is None and grid.matches(v.data.shape, v.affine):
            return resample_to_grid(v.data, v.affine, grid, kind)
        key = np.asarray(v.affine, dtype=np.float64).tobytes()
        if key not in cache:  # image, mask and seg usually share one affine: map the coordinates once
            cache[key] = source_voxel_coords(grid, v.affine, disp)
        return resample_to_grid(v.data, v.affine, grid, kind, coords=cache[key])

    img = run(image, "image")
    msk = run(mask, "mask") if mask is not None else None
    lab = run(seg, "labels") if seg is not None else None
    img = minmax(img, msk if (apply_mask and msk is not None) else None)
    return Preprocessed(img, msk, lab, grid, notes)
