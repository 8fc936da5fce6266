"""The voxel grid in world space, and the one conversion of its affine between NumPy and PyTorch.

A grid is a shape ``(D, H, W)`` and a 4x4 float64 ``affine`` mapping a voxel index ``(d, h, w, 1)`` to world
coordinates in mm (NIfTI's sform/qform convention; RAS+ world axes). Tensor axis ``2 + k`` of a
``[B, C, D, H, W]`` volume is voxel axis ``k``, so the spacing along tensor axis ``k`` is the norm of the affine's
column ``k`` (right for any rotation, flip or axis permutation).

Affines arrive as NumPy arrays (from NIfTI headers, the dataset) or as tensors (collated batches, checkpoints):
:func:`affine_to_numpy` and :func:`affine_to_tensor` are the only places that convert between the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

__all__ = ["Grid", "as_dims", "affine_to_numpy", "affine_to_tensor", "AFFINE_ATOL"]

#: mm; grids whose affines agree to this are the same grid.
AFFINE_ATOL = 1e-4

_Affine = Tensor | np.ndarray | Sequence[Sequence[float]]


def as_dims(dims: int | Sequence[int]) -> tuple[int, int, int]:
    """``128`` -> ``(128, 128, 128)``; a 3-sequence is checked and returned as a tuple of ints.

    Raises:
        ValueError: not one int or 3 ints, or a size below 2.
    """
    if isinstance(dims, int | np.integer):
        out = (int(dims),) * 3
    else:
        out = tuple(int(d) for d in dims)
    if len(out) != 3 or min(out) < 2:
        raise ValueError(f"dims must be an int or 3 ints >= 2; got {dims!r}")
    return out  # type: ignore[return-value]


def _check_shape(shape: tuple[int, ...], batched: bool) -> None:
    ok = shape == (4, 4) or (batched and len(shape) == 3 and shape[1:] == (4, 4))
    if not ok:
        want = "4x4 or [B, 4, 4]" if batched else "4x4"
        raise ValueError(f"affine must be {want} (voxel -> mm); got shape {shape}")


def affine_to_numpy(affine: _Affine, batched: bool = False) -> np.ndarray:
    """An affine (tensor on any device, array or nested list) as a float64 NumPy array (a copy for tensors).

    Args:
        affine: ``[4, 4]`` voxel -> mm; with ``batched``, ``[B, 4, 4]`` is accepted too (returned as given).
    Raises:
        ValueError: on any other shape.
    """
    if isinstance(affine, Tensor):
        a = affine.detach().cpu().to(torch.float64).numpy()
    else:
        a = np.asarray(affine, dtype=np.float64)
    _check_shape(tuple(a.shape), batched)
    return a


def affine_to_tensor(
    affine: _Affine,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    batched: bool = False,
) -> Tensor:
    """An affine as a tensor of ``dtype`` on ``device`` (float64 on the CPU by default).

    Args:
        affine: ``[4, 4]`` voxel -> mm; with ``batched``, ``[B, 4, 4]`` is accepted too.
    Raises:
        ValueError: on any other shape.
    """
    # torch.tensor copies: the result never shares memory with a (read-only) Grid affine
    return torch.tensor(affine_to_numpy(affine, batched), dtype=dtype, device=device)


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in world space: ``shape`` (D, H, W) and the 4x4 float64 voxel-index -> mm ``affine``.

    Immutable (the affine array is read-only); equal when the shapes match and the affines agree to
    :data:`AFFINE_ATOL` mm.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        affine = np.array(affine_to_numpy(self.affine) if isinstance(self.affine, Tensor) else self.affine,
                          dtype=np.float64)
        if len(shape) != 3 or affine.shape != (4, 4):
            raise ValueError(f"Grid: need a 3D shape and a 4x4 affine; got {shape}, {affine.shape}")
        affine.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_image(cls, image: nib.spatialimages.SpatialImage) -> Grid:
        """The grid of a loaded nibabel image (its first three dimensions; a 4th, e.g. vector channels, is not
        part of the grid)."""
        return cls(tuple(image.shape[:3]), np.asarray(image.affine, dtype=np.float64))

    @classmethod
    def from_nifti(cls, path: str | os.PathLike) -> Grid:
        """The grid of a NIfTI file, read from its header only (no voxel data).

        Raises:
            FileNotFoundError: naming the file if it does not exist.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        return cls.from_image(nib.load(str(path)))

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["shape"]), np.asarray(d["affine"], dtype=np.float64))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis ``(D, H, W)``: the norms of the affine's columns, ``[3]``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    def affine_tensor(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """The affine as a ``[4, 4]`` tensor (:func:`affine_to_tensor`)."""
        return affine_to_tensor(self.affine, dtype, device)

    def matches(self, shape: Sequence[int], affine: _Affine, atol: float = AFFINE_ATOL) -> bool:
        """Same shape and an affine equal within ``atol`` mm."""
        return tuple(int(s) for s in shape) == self.shape and np.allclose(
            affine_to_numpy(affine), self.affine, atol=atol
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and self.matches(other.shape, other.affine)

    def __hash__(self) -> int:
        return hash((self.shape, tuple(np.round(self.affine, 4).ravel())))

    def world_coords(self) -> np.ndarray:
        """World (mm) coordinates of every voxel centre: ``[D, H, W, 3]`` float64."""
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_dict(self) -> dict:
        """``{"shape": [D, H, W], "affine": 4 rows of 4 floats}`` (JSON-ready, as in a cohort's manifest)."""
        return {"shape": list(self.shape), "affine": [[float(v) for v in row] for row in self.affine]}

    def __repr__(self) -> str:
        return f"Grid(shape={self.shape}, spacing={np.round(self.spacing, 3).tolist()}, orientation={self.orientation})"
