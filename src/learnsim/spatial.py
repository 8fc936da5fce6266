"""Spatial transformations: the one place that owns learnsim's coordinate convention.

Convention (used by every other module):

* Volumes are tensors ``[B, C, D, H, W]``; a voxel is addressed by its index ``(d, h, w)``.
* Velocity fields ``v`` and displacements ``u`` are ``[B, 3, D, H, W]`` in **voxels**; channel ``c`` is the
  displacement along tensor axis ``2 + c`` (channel 0 along D, 1 along H, 2 along W).
* A map ``phi = id + u`` sends voxel ``x`` to ``x + u(x)``; warping an image ``M`` by ``phi`` gives
  ``(M o phi)(x) = M(x + u(x))`` (pull-back, as in the paper).
* :func:`torch.nn.functional.grid_sample` wants the reverse order ``(x, y, z) = (W, H, D)`` in ``[-1, 1]``
  with ``align_corners=True``; only :func:`to_sampling_grid` converts, so the channel-order bug cannot creep in
  elsewhere.
* With a NIfTI affine ``A`` (voxel index -> mm), a voxel displacement ``u`` is ``A[:3, :3] @ u`` in mm
  (:func:`displacement_to_mm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim.kernels.backend import use_numba

__all__ = [
    "identity_grid",
    "to_sampling_grid",
    "warp",
    "warp_labels",
    "integrate_svf",
    "compose",
    "jacobian_det",
    "displacement_to_mm",
    "bspline_kernel_1d",
    "bspline_control_shape",
    "bspline_to_dense",
    "gaussian_smooth",
    "separable_filter",
]

_Shape = Sequence[int]


def _check_field(field: Tensor, name: str) -> None:
    if field.dim() != 5 or field.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, D, H, W] (voxels); got shape {tuple(field.shape)}")


def identity_grid(shape: _Shape, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel coordinates of a grid: ``[1, 3, D, H, W]`` with channel ``c`` = index along axis ``c``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _norm_scale(shape: _Shape, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Voxel -> normalised scale per grid_sample coordinate, ordered (x, y, z) = (W, H, D)."""
    d, h, w = shape
    return torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1), 2.0 / max(d - 1, 1)], device=device, dtype=dtype)


def _identity_norm(shape: _Shape, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The identity sampling grid ``[1, D, H, W, 3]`` in grid_sample's normalised (x, y, z)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    gd, gh, gw = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((gw, gh, gd), dim=-1).unsqueeze(0)


_GRID_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _grid_constants(shape: _Shape, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # Grids are rebuilt millions of times in the q_v loop otherwise; they depend only on (shape, device, dtype).
    key = (tuple(int(s) for s in shape), str(device), dtype)
    hit = _GRID_CACHE.get(key)
    if hit is None:
        if len(_GRID_CACHE) > 32:
            _GRID_CACHE.clear()
        hit = (_identity_norm(shape, device, dtype), _norm_scale(shape, device, dtype))
        _GRID_CACHE[key] = hit
    return hit


def to_sampling_grid(disp: Tensor) -> Tensor:
    """Turn a voxel displacement ``[B, 3, D, H, W]`` into grid_sample's grid ``[B, D, H, W, 3]`` for ``id + disp``."""
    _check_field(disp, "disp")
    ident, scale = _grid_constants(disp.shape[2:], disp.device, disp.dtype)
    # channel order (D, H, W) -> grid order (x=W, y=H, z=D)
    return ident + disp.permute(0, 2, 3, 4, 1).flip(-1) * scale


def warp(
    image: Tensor,
    disp: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> Tensor:
    """Pull-back warp ``image o (id + disp)``.

    Args:
        image: ``[B, C, D, H, W]`` (B may be 1 and is then broadcast over the batch of ``disp``).
        disp: ``[B, 3, D, H, W]`` displacement in voxels.
        mode: ``"bilinear"`` (trilinear in 3D) for images, ``"nearest"`` for masks and label maps.
        padding_mode: grid_sample padding; ``"border"`` as in the original code.
    Returns:
        ``[B, C, D, H, W]`` warped image, same dtype as ``image``.
    """
    if image.dim() != 5:
        raise ValueError(f"warp: image must be [B, C, D, H, W]; got {tuple(image.shape)}")
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"warp: image grid {tuple(image.shape[2:])} != displacement grid {tuple(disp.shape[2:])}")
    if mode == "bilinear" and padding_mode == "border" and use_numba(image, disp) and image.shape[0] in (1, disp.shape[0]):
        from learnsim.kernels import ops

        return ops.warp(image.to(disp.dtype), disp).to(image.dtype)
    grid = to_sampling_grid(disp)
    if image.shape[0] == 1 and disp.shape[0] > 1:
        image = image.expand(disp.shape[0], *image.shape[1:])
    if image.dtype != grid.dtype:
        return F.grid_sample(image.to(grid.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True).to(image.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_labels(labels: Tensor, disp: Tensor) -> Tensor:
    """Nearest-neighbour warp of an integer label map ``[B, 1, D, H, W]``; returns the same integer dtype."""
    out = warp(labels.to(disp.dtype), disp, mode="nearest")
    return out.round().to(labels.dtype)


def compose(first: Tensor, second: Tensor) -> Tensor:
    """Displacement of ``(id + first) o (id + second)``, i.e. ``second + first o (id + second)`` (voxels)."""
    return second + warp(first, second)


def integrate_svf(v: Tensor, no_steps: int = 12) -> Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` (voxels).

    ``u_0 = v / 2^T`` then ``T`` times ``u <- u + u o (id + u)`` with trilinear sampling and border padding.

    Args:
        v: ``[B, 3, D, H, W]`` stationary velocity field in voxels.
        no_steps: number of squarings ``T`` (12 in the original code). ``0`` returns ``v`` itself.
    Returns:
        ``[B, 3, D, H, W]`` displacement ``u`` with ``phi = id + u``.
    """
    _check_field(v, "v")
    if no_steps < 0:
        raise ValueError(f"integrate_svf: no_steps must be >= 0; got {no_steps}")
    if use_numba(v):
        from learnsim.kernels import ops

        return ops.integrate_svf(v, no_steps)
    shape = v.shape[2:]
    ident, scale = _grid_constants(shape, v.device, v.dtype)
    # Work in grid_sample's normalised (x, y, z) units for the whole loop: one conversion in, one out, and
    # each squaring is then one add (the grid), one grid_sample and one add.
    to_norm = (scale / 2.0**no_steps).flip(0).view(1, 3, 1, 1, 1)  # channel c of v is axis (D, H, W)[c]
    disp = (v * to_norm).flip(1)  # channels now (x, y, z)
    for _ in range(no_steps):
        grid = ident + disp.permute(0, 2, 3, 4, 1)
        disp = disp + F.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (disp.flip(1) / scale.flip(0).view(1, 3, 1, 1, 1))


def jacobian_det(disp: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``phi = id + disp`` by central finite differences (one-sided at borders).

    Args:
        disp: ``[B, 3, D, H, W]`` displacement in voxels.
    Returns:
        ``[B, 1, D, H, W]`` (dimensionless; ``<= 0`` marks folding). With displacements in voxel units the
        determinant does not depend on the voxel spacing.
    """
    _check_field(disp, "disp")
    # grads[c][k] = d u_c / d x_k
    grads = [torch.gradient(disp[:, c], dim=(1, 2, 3)) for c in range(3)]
    j = [[grads[c][k] + (1.0 if c == k else 0.0) for k in range(3)] for c in range(3)]
    det = (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
    return det.unsqueeze(1)


def displacement_to_mm(disp: Tensor, affine: Tensor) -> Tensor:
    """Voxel displacement ``[B, 3, D, H, W]`` -> world displacement in mm through the 4x4 voxel->mm ``affine``.

    The result's channels are the world axes of the affine (RAS+ for canonical NIfTI).
    """
    _check_field(disp, "disp")
    lin = affine[:3, :3].to(device=disp.device, dtype=disp.dtype)
    return torch.einsum("ij,bjdhw->bidhw", lin, disp)


# ----------------------------------------------------------------------------------------------------------------
# Cubic B-spline parametrisation of the SVF (the original SVFFD_3D)
# ----------------------------------------------------------------------------------------------------------------


def _cubic_bspline(t: Tensor) -> Tensor:
    t = t.abs()
    return torch.where(
        t < 1,
        (4 - 6 * t**2 + 3 * t**3) / 6,
        torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)),
    )


def bspline_kernel_1d(spacing: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Cubic B-spline sampled at integer offsets ``j - 2s + 1``, ``j = 0..4s-2``, scaled by 1/s: ``[4s - 1]``."""
    s = int(spacing)
    j = torch.arange(4 * s - 1, device=device, dtype=dtype)
    return _cubic_bspline((j - 2 * s + 1) / s)


def bspline_control_shape(shape: _Shape, spacing: int | Sequence[int]) -> tuple[int, int, int]:
    """Control-grid size covering a dense grid: control point ``k`` sits at voxel ``(k - 1) * spacing``."""
    sp = [int(spacing)] * 3 if isinstance(spacing, int) else [int(s) for s in spacing]
    return tuple((n - 1) // s + 4 for n, s in zip(shape, sp, strict=True))  # type: ignore[return-value]


def bspline_to_dense(coeffs: Tensor, shape: _Shape, spacing: int | Sequence[int]) -> Tensor:
    """Evaluate a cubic B-spline field on the dense voxel grid.

    ``v(x) = sum_k c_k B3((x - (k - 1) s) / s)`` per axis (tensor product), implemented as separable transposed
    convolutions with stride ``s``.

    Args:
        coeffs: ``[B, C, Kd, Kh, Kw]`` control-point coefficients (voxels), Kd etc. from :func:`bspline_control_shape`.
        shape: dense grid ``(D, H, W)``.
        spacing: control-point spacing in voxels (int or one per axis).
    Returns:
        ``[B, C, D, H, W]``.
    """
    sp = [int(spacing)] * 3 if isinstance(spacing, int) else [int(s) for s in spacing]
    expected = bspline_control_shape(shape, sp)
    if tuple(coeffs.shape[2:]) != expected:
        raise ValueError(f"bspline_to_dense: control grid {tuple(coeffs.shape[2:])} != expected {expected} for {tuple(shape)}")
    out = coeffs
    b, c = coeffs.shape[:2]
    for axis, (n, s) in enumerate(zip(shape, sp, strict=True)):
        k = bspline_kernel_1d(s, coeffs.device, coeffs.dtype)
        # move the axis last, flatten the rest, transposed 1D conv, crop, move back
        x = out.movedim(2 + axis, -1)
        lead = x.shape[:-1]
        y = F.conv_transpose1d(x.reshape(-1, 1, x.shape[-1]), k.view(1, 1, -1), stride=s)
        start = 3 * s - 1
        y = y[..., start : start + n]
        out = y.reshape(*lead, n).movedim(-1, 2 + axis)
    assert out.shape == (b, c, *shape)
    return out


def gaussian_smooth(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing (replicate padding) of ``[B, C, D, H, W]``; ``sigma`` in voxels."""
    if sigma <= 0:
        return field
    radius = max(1, int(math.ceil(3 * sigma)))
    k = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(k)
    return separable_filter(field, [w / total for w in k])


def separable_filter(field: Tensor, kernel: Tensor | Sequence[float], padding_mode: str = "replicate") -> Tensor:
    """Apply the same odd-length 1D ``kernel`` along D, H and W of ``[B, C, D, H, W]`` (per channel).

    ``kernel`` given as Python floats (or a tensor that needs no gradient) is applied as a weighted sum of shifted
    views of one padded copy per axis: no grouped 1D ``conv3d`` (slow on CPU and, depthwise in 3D, on cuDNN). A
    kernel tensor that requires grad (a learnt LCC window) goes through ``conv3d`` so that it gets its gradient.
    Pass floats on CUDA: converting a device tensor costs a host sync.
    """
    if isinstance(kernel, Tensor):
        if kernel.dim() != 1:
            raise ValueError(f"separable_filter: kernel must be 1D; got {tuple(kernel.shape)}")
        if kernel.requires_grad:
            return _separable_conv(field, kernel, padding_mode)
        kernel = kernel.tolist()
    weights = [float(w) for w in kernel]
    if len(weights) % 2 != 1:
        raise ValueError(f"separable_filter: kernel length must be odd; got {len(weights)}")
    r = len(weights) // 2
    out = field
    for axis in range(3):
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        padded = F.pad(out, pad, mode=padding_mode) if r > 0 else out
        n = field.shape[2 + axis]
        acc = padded.narrow(2 + axis, 0, n) * weights[0]
        for j in range(1, len(weights)):
            acc.add_(padded.narrow(2 + axis, j, n), alpha=weights[j])
        out = acc
    return out


def _separable_conv(field: Tensor, kernel: Tensor, padding_mode: str) -> Tensor:
    if kernel.numel() % 2 != 1:
        raise ValueError(f"separable_filter: kernel must be 1D with odd length; got {tuple(kernel.shape)}")
    c = field.shape[1]
    r = kernel.numel() // 2
    out = field
    k = kernel.to(field.dtype)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        w = k.view(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode=padding_mode), w, groups=c)
    return out
