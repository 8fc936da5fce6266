"""CPU kernels (numba) for the q_v hot path: scaling-and-squaring steps, warps, separable smoothing, L2 regulariser.

Every kernel works on NumPy views of contiguous CPU tensors, in **voxel** units and learnsim's channel order
(channel ``c`` of a field is the displacement along tensor axis ``2 + c``; see :mod:`learnsim.spatial`), and
reproduces ``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="border", align_corners=True)``
including its gradient conventions:

* a sampling coordinate ``p`` is clamped to ``[0, n - 1]``; where it is clamped, *including exactly on the border*,
  its gradient is 0 (PyTorch treats the border as outside for the gradient);
* the trilinear taps are ``floor(p)`` and ``floor(p) + 1`` with weights ``1 - f`` and ``f``, ``f = p - floor(p)``.

Grids are passed as their coordinate vectors ``cz``, ``cy``, ``cx`` (``0 .. n - 1``) and ``unit = [0, 1]``, all in
the field's dtype, so that every operation stays in that dtype (float32 loads are not widened to float64).

Work is split over ``(batch, D)`` rows with ``prange``. Adjoint kernels that *scatter* (into the field being
sampled, or into an image) accumulate into one buffer per chunk of rows (``bufs[t]``), which the caller sums:
no atomics, and the result does not depend on thread scheduling (only on the number of chunks).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = [
    "squaring_forward",
    "squaring_backward",
    "warp_forward",
    "warp_backward",
    "smooth_axis",
    "l2_gradient",
]


@njit(cache=True, inline="always")
def _axis(p, top, zero, one):
    """Border clamp of a voxel coordinate ``p`` to ``[0, top]`` with grid_sample's gradient flag, then the
    lower tap, the upper tap (kept in range: its weight is exactly 0 whenever it would leave the grid) and the
    fractional weight. All arithmetic stays in the field's dtype (``zero``/``one`` carry it)."""
    if p <= zero:
        p = zero
        g = zero
    elif p >= top:
        p = top
        g = zero
    else:
        g = one
    i0 = int(p)  # p >= 0: truncation is floor
    f = p - (zero + i0)
    i1 = i0 + 1 if f > zero else i0
    return i0, i1, f, g


@njit(cache=True, inline="always")
def _corners(cz, cy, cx, z, y, x, uz, uy, ux, nh, nw, zero, one):
    """The 8 flat tap offsets and the weights/gradient flags of the sample at voxel ``(z, y, x) + (uz, uy, ux)``;
    ``cz``/``cy``/``cx`` are the grid's coordinates ``0..n-1`` in the field's dtype."""
    z0, z1, fz, gz = _axis(cz[z] + uz, cz[-1], zero, one)
    y0, y1, fy, gy = _axis(cy[y] + uy, cy[-1], zero, one)
    x0, x1, fx, gx = _axis(cx[x] + ux, cx[-1], zero, one)
    hw = nh * nw
    o00 = z0 * hw + y0 * nw
    o01 = z0 * hw + y1 * nw
    o10 = z1 * hw + y0 * nw
    o11 = z1 * hw + y1 * nw
    return o00, o01, o10, o11, x0, x1, fz, fy, fx, gz, gy, gx


@njit(cache=True, inline="always")
def _gather(a, o00, o01, o10, o11, x0, x1, fz, fy, fx, one):
    c00 = a[o00 + x0] * (one - fx) + a[o00 + x1] * fx
    c01 = a[o01 + x0] * (one - fx) + a[o01 + x1] * fx
    c10 = a[o10 + x0] * (one - fx) + a[o10 + x1] * fx
    c11 = a[o11 + x0] * (one - fx) + a[o11 + x1] * fx
    return (c00 * (one - fy) + c01 * fy) * (one - fz) + (c10 * (one - fy) + c11 * fy) * fz


@njit(cache=True, inline="always")
def _position_grad(a, o00, o01, o10, o11, x0, x1, fz, fy, fx, one):
    """Gradient of the trilinear sample of ``a`` w.r.t. the sampling position (along D, H, W)."""
    v000 = a[o00 + x0]
    v001 = a[o00 + x1]
    v010 = a[o01 + x0]
    v011 = a[o01 + x1]
    v100 = a[o10 + x0]
    v101 = a[o10 + x1]
    v110 = a[o11 + x0]
    v111 = a[o11 + x1]
    wz0, wy0, wx0 = one - fz, one - fy, one - fx
    dz = wy0 * (wx0 * (v100 - v000) + fx * (v101 - v001)) + fy * (wx0 * (v110 - v010) + fx * (v111 - v011))
    dy = wz0 * (wx0 * (v010 - v000) + fx * (v011 - v001)) + fz * (wx0 * (v110 - v100) + fx * (v111 - v101))
    dx = wz0 * (wy0 * (v001 - v000) + fy * (v011 - v010)) + fz * (wy0 * (v101 - v100) + fy * (v111 - v110))
    return dz, dy, dx


@njit(cache=True, inline="always")
def _scatter(r, gc, o00, o01, o10, o11, x0, x1, fz, fy, fx, one):
    """Transpose of :func:`_gather`: add ``gc`` times the 8 trilinear weights into ``r``."""
    wz0, wy0, wx0 = one - fz, one - fy, one - fx
    a = gc * wz0 * wy0
    r[o00 + x0] += a * wx0
    r[o00 + x1] += a * fx
    a = gc * wz0 * fy
    r[o01 + x0] += a * wx0
    r[o01 + x1] += a * fx
    a = gc * fz * wy0
    r[o10 + x0] += a * wx0
    r[o10 + x1] += a * fx
    a = gc * fz * fy
    r[o11 + x0] += a * wx0
    r[o11 + x1] += a * fx


@njit(parallel=True, cache=True)
def squaring_forward(u, out, cz, cy, cx, unit):
    """One squaring step ``out = u + u o (id + u)``; ``u``, ``out``: ``[B, 3, D*H*W]`` (flat grid), voxels."""
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    for bz in prange(nb * nd):
        b = bz // nd
        z = bz % nd
        uz, uy, ux = u[b, 0], u[b, 1], u[b, 2]  # views hoisted out of the voxel loop (no refcounting there)
        oz, oy, ox = out[b, 0], out[b, 1], out[b, 2]
        for y in range(nh):
            base = (z * nh + y) * nw
            for x in range(nw):
                i = base + x
                o00, o01, o10, o11, x0, x1, fz, fy, fx, _gz, _gy, _gx = _corners(
                    cz, cy, cx, z, y, x, uz[i], uy[i], ux[i], nh, nw, zero, one
                )
                oz[i] = uz[i] + _gather(uz, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                oy[i] = uy[i] + _gather(uy, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                ox[i] = ux[i] + _gather(ux, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)


@njit(parallel=True, cache=True)
def squaring_backward(u, g, bufs, cz, cy, cx, unit):
    """Adjoint of :func:`squaring_forward`: accumulates ``dL/du`` into ``bufs`` ``[T, B, 3, D*H*W]`` (zeroed by
    the caller; the gradient is ``bufs.sum(0)``), given ``g = dL/d out`` ``[B, 3, D*H*W]``."""
    nt = bufs.shape[0]
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    rows = nb * nd
    for t in prange(nt):
        acc = bufs[t]
        for bz in range(t * rows // nt, (t + 1) * rows // nt):
            b = bz // nd
            z = bz % nd
            uz, uy, ux = u[b, 0], u[b, 1], u[b, 2]  # views hoisted out of the voxel loop
            gzv, gyv, gxv = g[b, 0], g[b, 1], g[b, 2]
            rz, ry, rx = acc[b, 0], acc[b, 1], acc[b, 2]
            for y in range(nh):
                base = (z * nh + y) * nw
                for x in range(nw):
                    i = base + x
                    o00, o01, o10, o11, x0, x1, fz, fy, fx, gz, gy, gx = _corners(
                        cz, cy, cx, z, y, x, uz[i], uy[i], ux[i], nh, nw, zero, one
                    )
                    g0, g1, g2 = gzv[i], gyv[i], gxv[i]
                    # gradient through the sampling position, summed over the three sampled channels
                    d0z, d0y, d0x = _position_grad(uz, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                    d1z, d1y, d1x = _position_grad(uy, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                    d2z, d2y, d2x = _position_grad(ux, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                    # the identity term of u + u o (id + u), and the position gradient
                    rz[i] += g0 + (g0 * d0z + g1 * d1z + g2 * d2z) * gz
                    ry[i] += g1 + (g0 * d0y + g1 * d1y + g2 * d2y) * gy
                    rx[i] += g2 + (g0 * d0x + g1 * d1x + g2 * d2x) * gx
                    # transpose of the trilinear gather
                    _scatter(rz, g0, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                    _scatter(ry, g1, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                    _scatter(rx, g2, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)


@njit(parallel=True, cache=True)
def warp_forward(image, u, out, cz, cy, cx, unit):
    """``out = image o (id + u)``: ``image`` ``[1 or B, C, D*H*W]``, ``u`` ``[B, 3, D*H*W]``, ``out`` ``[B, C, D*H*W]``."""
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    nbi, nc = image.shape[0], image.shape[1]
    for bz in prange(nb * nd):
        b = bz // nd
        z = bz % nd
        bi = b if nbi > 1 else 0
        uz, uy, ux = u[b, 0], u[b, 1], u[b, 2]
        for c in range(nc):  # channel outermost: array views stay out of the voxel loop
            a = image[bi, c]
            o = out[b, c]
            for y in range(nh):
                base = (z * nh + y) * nw
                for x in range(nw):
                    i = base + x
                    o00, o01, o10, o11, x0, x1, fz, fy, fx, _gz, _gy, _gx = _corners(
                        cz, cy, cx, z, y, x, uz[i], uy[i], ux[i], nh, nw, zero, one
                    )
                    o[i] = _gather(a, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)


@njit(parallel=True, cache=True)
def warp_backward(image, u, g, grad_u, bufs, need_image, cz, cy, cx, unit):
    """Adjoint of :func:`warp_forward` given ``g = dL/d out`` ``[B, C, D*H*W]``.

    Writes ``dL/du`` into ``grad_u`` ``[B, 3, D*H*W]`` (every voxel written); if ``need_image``, accumulates
    ``dL/d image`` into ``bufs`` ``[T, 1 or B, C, D*H*W]`` (zeroed by the caller; the gradient is ``bufs.sum(0)``).
    """
    nt = bufs.shape[0]
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    nbi, nc = image.shape[0], image.shape[1]
    rows = nb * nd
    for t in prange(nt):
        acc = bufs[t]
        for bz in range(t * rows // nt, (t + 1) * rows // nt):
            b = bz // nd
            z = bz % nd
            bi = b if nbi > 1 else 0
            uz, uy, ux = u[b, 0], u[b, 1], u[b, 2]
            dz_, dy_, dx_ = grad_u[b, 0], grad_u[b, 1], grad_u[b, 2]
            for c in range(nc):  # channel outermost: array views stay out of the voxel loop
                a = image[bi, c]
                gc_ = g[b, c]
                r = acc[bi if need_image else 0, c if need_image else 0]
                for y in range(nh):
                    base = (z * nh + y) * nw
                    for x in range(nw):
                        i = base + x
                        o00, o01, o10, o11, x0, x1, fz, fy, fx, gz, gy, gx = _corners(
                            cz, cy, cx, z, y, x, uz[i], uy[i], ux[i], nh, nw, zero, one
                        )
                        gc = gc_[i]
                        dz, dy, dx = _position_grad(a, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)
                        if c == 0:
                            dz_[i] = gc * dz * gz
                            dy_[i] = gc * dy * gy
                            dx_[i] = gc * dx * gx
                        else:
                            dz_[i] += gc * dz * gz
                            dy_[i] += gc * dy * gy
                            dx_[i] += gc * dx * gx
                        if need_image:
                            _scatter(r, gc, o00, o01, o10, o11, x0, x1, fz, fy, fx, one)


@njit(parallel=True, cache=True)
def smooth_axis(src, dst, weights, axis):
    """``dst = src`` filtered along ``axis`` (0: D, 1: H, 2: W) of ``[N, D, H, W]`` with the odd-length 1D
    ``weights`` (correlation, replicate padding)."""
    nn_, nd, nh, nw = src.shape
    k = weights.shape[0]
    r = k // 2
    for nz in prange(nn_ * nd):
        n = nz // nd
        z = nz % nd
        if axis == 0:
            for y in range(nh):
                for x in range(nw):
                    dst[n, z, y, x] = 0.0
            for j in range(k):
                zz = min(max(z + j - r, 0), nd - 1)
                w = weights[j]
                for y in range(nh):
                    for x in range(nw):
                        dst[n, z, y, x] += w * src[n, zz, y, x]
        elif axis == 1:
            for y in range(nh):
                for x in range(nw):
                    dst[n, z, y, x] = 0.0
                for j in range(k):
                    yy = min(max(y + j - r, 0), nh - 1)
                    w = weights[j]
                    for x in range(nw):
                        dst[n, z, y, x] += w * src[n, z, yy, x]
        else:
            for y in range(nh):
                for x in range(nw):
                    s = 0.0
                    for j in range(k):
                        xx = min(max(x + j - r, 0), nw - 1)
                        s += weights[j] * src[n, z, y, xx]
                    dst[n, z, y, x] = s


@njit(parallel=True, cache=True)
def l2_gradient(v, w_reg, grad, row_energy):
    """``0.5 w_reg sum`` of squared forward differences of ``v`` ``[B, C, D, H, W]`` along D, H, W, and its gradient.

    Writes ``grad`` (same shape as ``v``) and ``row_energy`` ``[B * D]`` (the energy of each ``(b, z)`` slab's
    forward differences; the per-pair energy is the sum over its ``D`` rows).
    """
    nb, nc, nd, nh, nw = v.shape
    for bz in prange(nb * nd):
        b = bz // nd
        z = bz % nd
        e = 0.0
        for c in range(nc):
            a = v[b, c]
            for y in range(nh):
                for x in range(nw):
                    here = a[z, y, x]
                    gr = 0.0
                    if z + 1 < nd:
                        d = a[z + 1, y, x] - here
                        e += d * d
                        gr -= d
                    if z > 0:
                        gr += here - a[z - 1, y, x]
                    if y + 1 < nh:
                        d = a[z, y + 1, x] - here
                        e += d * d
                        gr -= d
                    if y > 0:
                        gr += here - a[z, y - 1, x]
                    if x + 1 < nw:
                        d = a[z, y, x + 1] - here
                        e += d * d
                        gr -= d
                    if x > 0:
                        gr += here - a[z, y, x - 1]
                    grad[b, c, z, y, x] = w_reg * gr
        row_energy[bz] = 0.5 * w_reg * e


def new_buffers(chunks: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeroed per-chunk accumulators ``[chunks, *shape]`` for the scattering adjoints."""
    return np.zeros((chunks, *shape), dtype=dtype)
