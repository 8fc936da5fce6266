"""The input convention of the original LearnSim release's networks: where their voxels are, and their intensities.

The original data loader (``base/base_dataset.py``, ``data_loader/biobank_dataset.py`` of the original code) turns
a NIfTI file into a network input in four steps:

1. ``sitk.GetArrayFromImage``: the stored voxels as an array ``[k, j, i]`` (NIfTI axes reversed, no resampling);
2. the flattened array is reversed: **all three axes flipped**;
3. zero padding to a cube, ``(max(shape) - n) // 2`` voxels on **both** sides of each axis (so an axis whose
   deficit is odd ends one voxel short of the cube);
4. ``F.interpolate(size=128^3, mode="trilinear", align_corners=True)`` (nearest for masks and labels), then
   min-max scaling of the whole volume to [0, 1] (``utils.rescale_im``).

Its UK Biobank images were affine-registered to FSL's MNI152 (182 x 218 x 182 voxels, 1 mm, stored LAS:
``i`` towards the left, ``j`` anterior, ``k`` superior). After steps 1-2 the network's tensor axes therefore run
towards **inferior, posterior, right** (:data:`NETWORK_AXCODES` = ``("I", "P", "R")``), and its velocity
channel ``c`` is a displacement along tensor axis ``c`` (as in learnsim).

:func:`network_grid` states steps 1-4 as one voxel grid in world space: network voxel ``n`` -> mm. Any NIfTI file,
in any orientation, resampled onto that grid through its affine (trilinear, zeros outside, as steps 3-4 do) is
then exactly what the original loader made of the same image stored LAS. :class:`SignedPermutation` maps tensors
between the network's axes and another grid's (learnsim's cohorts are RAS) without interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from torch import Tensor

from learnsim.grid import Grid

__all__ = ["NETWORK_AXCODES", "STORED_AXCODES", "network_grid", "SignedPermutation"]

#: the tensor axes of the original networks' inputs (after the loader's flip of an LAS-stored image)
NETWORK_AXCODES: tuple[str, str, str] = ("I", "P", "R")
#: how the original's training images were stored (FSL MNI152 space)
STORED_AXCODES: tuple[str, str, str] = ("L", "A", "S")


def _reoriented(shape: Sequence[int], affine: np.ndarray, axcodes: Sequence[str]) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the same voxels stored with axes ``axcodes`` (a permutation/flip, no resampling)."""
    src = nib.orientations.io_orientation(affine)
    xform = nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(tuple(axcodes)))
    new_shape = tuple(int(shape[int(i)]) for i in np.argsort(xform[:, 0]))
    return new_shape, np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(xform, tuple(shape))


def network_grid(shape: Sequence[int], affine: np.ndarray, dims: Sequence[int] = (128, 128, 128)) -> Grid:
    """The grid (voxel -> mm) of the original loader's output for an image of ``shape`` / ``affine``.

    The image is first taken as stored LAS (the original's data; an image stored otherwise is the same anatomy
    with its axes permuted/flipped), then steps 1-4 of the module docstring: network voxel ``(n0, n1, n2)`` reads
    LAS voxel ``(X-1-(n2 s2 - p2), Y-1-(n1 s1 - p1), Z-1-(n0 s0 - p0))`` with ``p`` the pads and
    ``s_a = (P_a - 1) / (dims_a - 1)`` the ``align_corners=True`` step over the padded size ``P_a``.

    Args:
        shape: the image's ``(X, Y, Z)`` as stored. affine: its voxel -> mm.
        dims: the network's input grid (``inshape``, 128^3 for the release).
    Returns:
        :class:`~learnsim.grid.Grid` of ``dims`` voxels whose tensor axes run I, P, R.
    """
    if len(shape) != 3 or len(dims) != 3 or min(dims) < 2:
        raise ValueError(f"network_grid: need a 3D shape and dims >= 2; got {tuple(shape)}, {tuple(dims)}")
    (x, y, z), las = _reoriented(shape, affine, STORED_AXCODES)
    sitk_shape = (z, y, x)  # step 1: the array's axes are k, j, i
    side = max(sitk_shape)
    pads = [(side - n) // 2 for n in sitk_shape]
    steps = [(n + 2 * p - 1) / (d - 1) for n, p, d in zip(sitk_shape, pads, dims, strict=True)]
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for net_axis, las_axis in ((0, 2), (1, 1), (2, 0)):  # network axis a is sitk axis a, i.e. LAS axis 2 - a
        n = sitk_shape[net_axis]
        m[las_axis, net_axis] = -steps[net_axis]  # flipped (step 2) ...
        m[las_axis, 3] = n - 1 + pads[net_axis]  # ... after the pad (step 3) is undone
    return Grid(tuple(int(d) for d in dims), las @ m)


@dataclass(frozen=True)
class SignedPermutation:
    """A reorientation of ``[B, C, D, H, W]`` tensors: output axis ``k`` is input axis ``perm[k]``, reversed where
    ``flip[k]``. Exact (no interpolation). Fields (channel ``c`` = displacement along axis ``c``, voxels) also have
    their channels permuted and negated (:meth:`field`)."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def between(cls, source: Sequence[str], target: Sequence[str]) -> SignedPermutation:
        """From a grid whose axes run ``source`` (e.g. ``("R", "A", "S")``) to one whose axes run ``target``."""
        opposite = dict(zip("RASLPI", "LPIRAS", strict=True))
        perm, flip = [], []
        for code in target:
            hits = [i for i, c in enumerate(source) if c == code or c == opposite[code]]
            if len(hits) != 1:
                raise ValueError(f"SignedPermutation: axes {tuple(source)} and {tuple(target)} are not a reorientation")
            perm.append(hits[0])
            flip.append(source[hits[0]] != code)
        return cls(tuple(perm), tuple(flip))  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def inverse(self) -> SignedPermutation:
        perm, flip = [0, 0, 0], [False, False, False]
        for k, i in enumerate(self.perm):
            perm[i], flip[i] = k, self.flip[k]
        return SignedPermutation(tuple(perm), tuple(flip))  # type: ignore[arg-type]

    def volume(self, x: Tensor) -> Tensor:
        """``[B, C, D, H, W]`` -> the same voxels on the target axes."""
        if self.is_identity:
            return x
        x = x.permute(0, 1, *(2 + i for i in self.perm))
        dims = [2 + k for k, f in enumerate(self.flip) if f]
        return x.flip(dims) if dims else x

    def field(self, u: Tensor) -> Tensor:
        """A voxel displacement ``[B, 3, D, H, W]`` on the target axes: voxels moved, components permuted and
        negated along reversed axes."""
        if self.is_identity:
            return u
        u = self.volume(u)[:, list(self.perm)]
        signs = u.new_tensor([-1.0 if f else 1.0 for f in self.flip]).view(1, 3, 1, 1, 1)
        return u * signs
