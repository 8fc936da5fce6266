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

import numpy as np
from numba import njit, prange

FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # FMA and reordering; no nnan/ninf: NaNs stay visible

__all__ = [
    "squaring_forward",
    "squaring_backward",
    "warp_forward",
    "warp_backward",
    "smooth_axis",
    "l2_gradient",
]


@njit(cache=True, fastmath=FASTMATH)
def _axis(p, top, zero, one):
    """Border clamp of a voxel coordinate ``p`` to ``[0, top]`` with grid_sample's gradient flag, then the
    lower tap, the upper tap (kept in range: its weight is exactly 0 whenever it would leave the grid) and the
    fractional weight. Taps are unsigned (``uint64``): with signed indices numba guards every load against
    negative (wrap-around) indexing, which cost 40 % of a squaring step; ``f`` stays in the field's dtype
    (``p - floor(p)`` is exact).

    A NaN coordinate fails every comparison: ``not (p > zero)`` sends it to the lower border (gradient 0) like
    ``-inf``, so that whatever the values (NaN, inf, 1e30) the taps stay on the grid; the sample then reads a
    border voxel and the NaN stays visible in the field itself."""
    if not (p > zero):  # p <= 0, or NaN
        p = zero
        g = zero
    elif p >= top:
        p = top
        g = zero
    else:
        g = one
    fl = np.floor(p)
    i0 = np.uint64(fl)
    # the upper tap exists even at f == 0 (an integer coordinate): its slope is the gradient there
    i1 = i0 + np.uint64(1) if p < top else i0
    return i0, i1, p - fl, g


@njit(cache=True, fastmath=FASTMATH)
def _corners(cz, cy, cx, z, y, x, uz, uy, ux, nh, nw, zero, one):
    """Tap offsets, weights and gradient flags of the sample at voxel ``(z, y, x) + (uz, uy, ux)``.

    ``cz``/``cy``/``cx`` are the grid's coordinates ``0..n-1`` in the field's dtype. Returns the flat offsets
    (``uint64``) of the four ``(z, y)`` rows (``o00`` = (z0, y0), ``o01`` = (z0, y1), ``o10`` = (z1, y0),
    ``o11`` = (z1, y1)), the two columns ``x0, x1``, the fractional weights ``fz, fy, fx`` and the gradient flags
    ``gz, gy, gx``.
    """
    z0, z1, fz, gz = _axis(cz[z] + uz, cz[-1], zero, one)
    y0, y1, fy, gy = _axis(cy[y] + uy, cy[-1], zero, one)
    x0, x1, fx, gx = _axis(cx[x] + ux, cx[-1], zero, one)
    nwu = np.uint64(nw)
    hw = np.uint64(nh) * nwu
    o00 = z0 * hw + y0 * nwu
    o01 = z0 * hw + y1 * nwu
    o10 = z1 * hw + y0 * nwu
    o11 = z1 * hw + y1 * nwu
    return o00, o01, o10, o11, x0, x1, fz, fy, fx, gz, gy, gx


@njit(cache=True, fastmath=FASTMATH)
def _load8(a, o00, o01, o10, o11, x0, x1):
    """The 8 trilinear taps of ``a``, ordered (z, y, x) = 000, 001, 010, 011, 100, 101, 110, 111."""
    return (a[o00 + x0], a[o00 + x1], a[o01 + x0], a[o01 + x1], a[o10 + x0], a[o10 + x1], a[o11 + x0], a[o11 + x1])


@njit(cache=True, fastmath=FASTMATH)
def _weights(fz, fy, fx, one):
    """Trilinear weights of the 8 taps (same order as :func:`_load8`) and the 4-tap weights of each face pair
    (``yx``: for the z-slope, ``zx``: y-slope, ``zy``: x-slope)."""
    wz, wy, wx = one - fz, one - fy, one - fx
    yx = (wy * wx, wy * fx, fy * wx, fy * fx)
    zx = (wz * wx, wz * fx, fz * wx, fz * fx)
    zy = (wz * wy, wz * fy, fz * wy, fz * fy)
    w = (wz * yx[0], wz * yx[1], wz * yx[2], wz * yx[3], fz * yx[0], fz * yx[1], fz * yx[2], fz * yx[3])
    return w, yx, zx, zy


@njit(cache=True, fastmath=FASTMATH)
def _dot8(w, v):
    return w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3] + w[4] * v[4] + w[5] * v[5] + w[6] * v[6] + w[7] * v[7]


@njit(cache=True, fastmath=FASTMATH)
def _slopes(v, yx, zx, zy):
    """Gradient of the trilinear sample w.r.t. the sampling position (along D, H, W) from its 8 taps."""
    dz = yx[0] * (v[4] - v[0]) + yx[1] * (v[5] - v[1]) + yx[2] * (v[6] - v[2]) + yx[3] * (v[7] - v[3])
    dy = zx[0] * (v[2] - v[0]) + zx[1] * (v[3] - v[1]) + zx[2] * (v[6] - v[4]) + zx[3] * (v[7] - v[5])
    dx = zy[0] * (v[1] - v[0]) + zy[1] * (v[3] - v[2]) + zy[2] * (v[5] - v[4]) + zy[3] * (v[7] - v[6])
    return dz, dy, dx


@njit(cache=True, fastmath=FASTMATH)
def _scatter(r, gc, w, o00, o01, o10, o11, x0, x1):
    """Transpose of the trilinear gather: add ``gc`` times the 8 weights ``w`` into the taps of ``r``."""
    r[o00 + x0] += gc * w[0]
    r[o00 + x1] += gc * w[1]
    r[o01 + x0] += gc * w[2]
    r[o01 + x1] += gc * w[3]
    r[o10 + x0] += gc * w[4]
    r[o10 + x1] += gc * w[5]
    r[o11 + x0] += gc * w[6]
    r[o11 + x1] += gc * w[7]


@njit(cache=True, fastmath=FASTMATH)
def _load8c(a, o00, o01, o10, o11, x0, x1, c):
    """:func:`_load8` for channel ``c`` of a channels-last field ``a`` ``[D*H*W*3]``."""
    t, cu = np.uint64(3), np.uint64(c)
    return (
        a[t * (o00 + x0) + cu],
        a[t * (o00 + x1) + cu],
        a[t * (o01 + x0) + cu],
        a[t * (o01 + x1) + cu],
        a[t * (o10 + x0) + cu],
        a[t * (o10 + x1) + cu],
        a[t * (o11 + x0) + cu],
        a[t * (o11 + x1) + cu],
    )


@njit(cache=True, fastmath=FASTMATH)
def _scatter_c(r, gc, w, o00, o01, o10, o11, x0, x1, c):
    """:func:`_scatter` into channel ``c`` of a channels-last field ``r`` ``[D*H*W*3]``."""
    t, cu = np.uint64(3), np.uint64(c)
    r[t * (o00 + x0) + cu] += gc * w[0]
    r[t * (o00 + x1) + cu] += gc * w[1]
    r[t * (o01 + x0) + cu] += gc * w[2]
    r[t * (o01 + x1) + cu] += gc * w[3]
    r[t * (o10 + x0) + cu] += gc * w[4]
    r[t * (o10 + x1) + cu] += gc * w[5]
    r[t * (o11 + x0) + cu] += gc * w[6]
    r[t * (o11 + x1) + cu] += gc * w[7]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def squaring_forward(u, out, cz, cy, cx, unit, row_reach):
    """One squaring step ``out = u + u o (id + u)``.

    ``u``, ``out``: **channels-last** ``[B, D*H*W*3]`` (the three components of a voxel side by side, so that a
    trilinear tap reads one cache line for all of them), voxels. ``row_reach`` ``[B * D]`` receives each
    ``(b, z)`` row's largest ``|u_z|`` (how far along D its samples reach; the adjoint's schedule needs it).
    """
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    u1, u2 = np.uint64(1), np.uint64(2)
    for bz in prange(nb * nd):
        b = bz // nd
        z = bz % nd
        a = u[b]  # view hoisted out of the voxel loop (no refcounting there)
        o = out[b]
        reach = zero
        for y in range(nh):
            base = (z * nh + y) * nw
            for x in range(nw):
                i = np.uint64(3 * (base + x))  # unsigned: no wrap-around guard on the loads
                ra = abs(a[i])
                if not (ra <= reach) and reach == reach:  # NaN-aware max: one NaN makes the row's reach NaN
                    reach = ra
                o00, o01, o10, o11, x0, x1, fz, fy, fx, _gz, _gy, _gx = _corners(
                    cz, cy, cx, z, y, x, a[i], a[i + u1], a[i + u2], nh, nw, zero, one
                )
                w, _yx, _zx, _zy = _weights(fz, fy, fx, one)
                o[i] = a[i] + _dot8(w, _load8c(a, o00, o01, o10, o11, x0, x1, 0))
                o[i + u1] = a[i + u1] + _dot8(w, _load8c(a, o00, o01, o10, o11, x0, x1, 1))
                o[i + u2] = a[i + u2] + _dot8(w, _load8c(a, o00, o01, o10, o11, x0, x1, 2))
        row_reach[bz] = reach


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def squaring_backward(u, g, acc, cz, cy, cx, unit, slab):
    """Adjoint of :func:`squaring_forward` (channels-last ``[B, D*H*W*3]``): accumulates ``dL/du`` into ``acc``
    (zeroed by the caller), given ``g = dL/d out``.

    The transpose of the trilinear gather scatters into the taps of each sample, up to ``m`` rows away along D
    (``m = ceil(max |u_z|) + 1``). Rows are cut into slabs of ``slab >= 2 m`` rows per batch element; all even
    slabs run in parallel, then all odd ones: two slabs of one phase are a slab apart, so their scatters never
    touch the same voxel. No atomics, no per-thread copies, and a fixed summation order (deterministic).
    """
    nb = u.shape[0]
    nd, nh, nw = cz.shape[0], cy.shape[0], cx.shape[0]
    zero, one = unit[0], unit[1]
    u1, u2 = np.uint64(1), np.uint64(2)
    per_b = (nd + slab - 1) // slab
    for phase in range(2):
        n_items = nb * ((per_b - phase + 1) // 2)
        for item in prange(n_items):
            b = item % nb
            s = 2 * (item // nb) + phase
            a = u[b]  # views hoisted out of the voxel loop
            gb = g[b]
            r = acc[b]
            for z in range(s * slab, min((s + 1) * slab, nd)):
                for y in range(nh):
                    base = (z * nh + y) * nw
                    for x in range(nw):
                        i = np.uint64(3 * (base + x))  # unsigned: no wrap-around guard on the loads
                        o00, o01, o10, o11, x0, x1, fz, fy, fx, gz, gy, gx = _corners(
                            cz, cy, cx, z, y, x, a[i], a[i + u1], a[i + u2], nh, nw, zero, one
                        )
                        w, yx, zx, zy = _weights(fz, fy, fx, one)
                        g0, g1, g2 = gb[i], gb[i + u1], gb[i + u2]
                        # gradient through the sampling position, summed over the three sampled channels
                        d0z, d0y, d0x = _slopes(_load8c(a, o00, o01, o10, o11, x0, x1, 0), yx, zx, zy)
                        d1z, d1y, d1x = _slopes(_load8c(a, o00, o01, o10, o11, x0, x1, 1), yx, zx, zy)
                        d2z, d2y, d2x = _slopes(_load8c(a, o00, o01, o10, o11, x0, x1, 2), yx, zx, zy)
                        # the identity term of u + u o (id + u), and the position gradient
                        r[i] += g0 + (g0 * d0z + g1 * d1z + g2 * d2z) * gz
                        r[i + u1] += g1 + (g0 * d0y + g1 * d1y + g2 * d2y) * gy
                        r[i + u2] += g2 + (g0 * d0x + g1 * d1x + g2 * d2x) * gx
                        # transpose of the trilinear gather
                        _scatter_c(r, g0, w, o00, o01, o10, o11, x0, x1, 0)
                        _scatter_c(r, g1, w, o00, o01, o10, o11, x0, x1, 1)
                        _scatter_c(r, g2, w, o00, o01, o10, o11, x0, x1, 2)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
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
                    w, _yx, _zx, _zy = _weights(fz, fy, fx, one)
                    o[i] = _dot8(w, _load8(a, o00, o01, o10, o11, x0, x1))


@njit(parallel=True, cache=True, fastmath=FASTMATH)
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
                        w, yx, zx, zy = _weights(fz, fy, fx, one)
                        gc = gc_[i]
                        dz, dy, dx = _slopes(_load8(a, o00, o01, o10, o11, x0, x1), yx, zx, zy)
                        if c == 0:
                            dz_[i] = gc * dz * gz
                            dy_[i] = gc * dy * gy
                            dx_[i] = gc * dx * gx
                        else:
                            dz_[i] += gc * dz * gz
                            dy_[i] += gc * dy * gy
                            dx_[i] += gc * dx * gx
                        if need_image:
                            _scatter(r, gc, w, o00, o01, o10, o11, x0, x1)


@njit(cache=True, fastmath=FASTMATH)
def _filter_row_w(row, d, weights):
    """``d = row`` filtered along its own (W) axis, replicate padding: clamped taps only at the two borders."""
    nw, k = row.shape[0], weights.shape[0]
    r = k // 2
    left = min(r, nw)
    for x in range(left):
        d[x] = _clamped_taps(row, weights, x)
    for x in range(r, nw - r):  # the interior: no clamping, one vectorisable loop
        acc = weights[0] * row[x - r]
        for j in range(1, k):
            acc += weights[j] * row[x + j - r]
        d[x] = acc
    for x in range(max(nw - r, left), nw):
        d[x] = _clamped_taps(row, weights, x)


@njit(cache=True, fastmath=FASTMATH)
def _clamped_taps(row, weights, x):
    """One output of the replicate-padded correlation of ``row`` with ``weights`` at ``x`` (taps clamped)."""
    nw, r = row.shape[0], weights.shape[0] // 2
    acc = weights[0] - weights[0]  # a zero of the weights' dtype
    for j in range(weights.shape[0]):
        acc += weights[j] * row[min(max(x + j - r, 0), nw - 1)]
    return acc


@njit(cache=True, fastmath=FASTMATH)
def _accumulate_row(d, row, w, first):
    """``d = w * row`` (``first``) or ``d += w * row``, along a contiguous row."""
    if first:
        for x in range(d.shape[0]):
            d[x] = w * row[x]
    else:
        for x in range(d.shape[0]):
            d[x] += w * row[x]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def smooth_axis(src, dst, weights, axis):
    """``dst = src`` filtered along ``axis`` (0: D, 1: H, 2: W) of ``[N, D, H, W]`` with the odd-length 1D
    ``weights`` (correlation, replicate padding).

    Every inner loop runs along a contiguous W row (row views, indices from ``range``), so that LLVM vectorises it:
    along D and H a row of ``dst`` accumulates whole source rows; along W the interior of a row has no clamping.
    """
    nn_, nd, nh, _nw = src.shape
    k = weights.shape[0]
    r = k // 2
    for nz in prange(nn_ * nd):
        n = nz // nd
        z = nz % nd
        for y in range(nh):
            if axis == 2:
                _filter_row_w(src[n, z, y], dst[n, z, y], weights)
                continue
            for j in range(k):
                zz, yy = (min(max(z + j - r, 0), nd - 1), y) if axis == 0 else (z, min(max(y + j - r, 0), nh - 1))
                _accumulate_row(dst[n, z, y], src[n, zz, yy], weights[j], j == 0)


@njit(cache=True, fastmath=FASTMATH)
def _l2_row(here, other, out, forward):
    """One neighbour's term of the L2 regulariser along a W row: for a forward neighbour ``d = other - here``
    adds ``d^2`` to the returned energy and ``-d`` to ``out``; for a backward one adds ``here - other``."""
    e = 0.0
    if forward:
        for x in range(here.shape[0]):
            d = other[x] - here[x]
            e += d * d
            out[x] -= d
    else:
        for x in range(here.shape[0]):
            out[x] += here[x] - other[x]
    return e


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def l2_gradient(v, w_reg, grad, row_energy):
    """``0.5 w_reg sum`` of squared forward differences of ``v`` ``[B, C, D, H, W]`` along D, H, W, and its gradient.

    Writes ``grad`` (same shape as ``v``) and ``row_energy`` ``[B * D]`` (the energy of each ``(b, z)`` slab's
    forward differences; the per-pair energy is the sum over its ``D`` rows). Each term is one pass along
    contiguous W rows (vectorised); a voxel's gradient adds its terms in the order D, H, W (forward difference,
    then backward).
    """
    nb, nc, nd, nh, nw = v.shape
    for bz in prange(nb * nd):
        b = bz // nd
        z = bz % nd
        e = 0.0
        for c in range(nc):
            a = v[b, c]
            for y in range(nh):
                here = a[z, y]
                out = grad[b, c, z, y]
                for x in range(nw):
                    out[x] = here[x] - here[x]  # zero (NaN where v is: as the plain sums)
                if z + 1 < nd:
                    e += _l2_row(here, a[z + 1, y], out, True)
                if z > 0:
                    _l2_row(here, a[z - 1, y], out, False)
                if y + 1 < nh:
                    e += _l2_row(here, a[z, y + 1], out, True)
                if y > 0:
                    _l2_row(here, a[z, y - 1], out, False)
                # along W, within the row: the same two terms on shifted views
                e += _l2_row(here[:-1], here[1:], out[:-1], True)
                _l2_row(here[1:], here[:-1], out[1:], False)
                for x in range(nw):
                    out[x] *= w_reg
        row_energy[bz] = 0.5 * w_reg * e
