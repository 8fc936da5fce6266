"""CPU kernels (numba) for the local cross-correlation energy and its gradient w.r.t. the warped image.

LCC over a ``(2 r + 1)^3`` window with replicate padding, exactly as :func:`learnsim.energies.lcc` computes it:
window sums ``S_F, S_M, S_FF, S_MM, S_FM`` (separable box filters), ``cross = S_FM - S_F S_M / n``,
``var_F = S_FF - S_F^2 / n``, ``var_M = S_MM - S_M^2 / n`` (``n = (2 r + 1)^3``) and the energy
``E = -sum_x mask(x) cross^2 / (var_F var_M + eps)``.

Gradient: with ``a = dE/dS_FM``, ``b = dE/dS_M``, ``c = dE/dS_MM`` per voxel (computed with the energy),
``dE/dM(y) = F(y) (W^T a)(y) + (W^T b)(y) + 2 M(y) (W^T c)(y)``, where ``W^T`` is the adjoint of the
replicate-padded box sum: along each axis, the value at ``x`` is added to every ``clamp(x + k)``, ``|k| <= r``.
The box sums themselves are :func:`learnsim.kernels.trilinear_numba.smooth_axis` with a window of ones.

Arrays are ``[N, D, H, W]`` (``N`` = batch x channels); work is split over ``(N, D)`` or lines with ``prange``.
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["box_adjoint_axis", "lcc_energy_terms"]


@njit(cache=True)
def _spread_row(src, dst, r):
    """Adjoint of a replicate-padded box sum along one contiguous row: ``dst[clamp(x + k)] += src[x]``."""
    nw = src.shape[0]
    for x in range(nw):
        dst[x] = 0.0
    for x in range(nw):
        v = src[x]
        for k in range(-r, r + 1):
            dst[min(max(x + k, 0), nw - 1)] += v


@njit(cache=True)
def _add_row(dst, src):
    for x in range(dst.shape[0]):
        dst[x] += src[x]


@njit(parallel=True, cache=True)
def _box_adjoint_d(src, dst, r):
    """:func:`box_adjoint_axis` along D: lines along D, parallel over ``(n, y)``."""
    nn_, nd, nh, _nw = src.shape
    for ny in prange(nn_ * nh):
        n = ny // nh
        y = ny % nh
        for z in range(nd):
            dst[n, z, y, :] = 0.0
        for z in range(nd):
            for k in range(-r, r + 1):
                _add_row(dst[n, min(max(z + k, 0), nd - 1), y], src[n, z, y])


@njit(parallel=True, cache=True)
def _box_adjoint_hw(src, dst, r, axis):
    """:func:`box_adjoint_axis` along H (``axis`` 1) or W (2): parallel over ``(n, z)`` slabs."""
    nn_, nd, nh, _nw = src.shape
    for nz in prange(nn_ * nd):
        n = nz // nd
        z = nz % nd
        if axis == 2:
            for y in range(nh):
                _spread_row(src[n, z, y], dst[n, z, y], r)
            continue
        dst[n, z, :, :] = 0.0
        for y in range(nh):
            for k in range(-r, r + 1):
                _add_row(dst[n, z, min(max(y + k, 0), nh - 1)], src[n, z, y])


def box_adjoint_axis(src, dst, r: int, axis: int) -> None:
    """Adjoint of the replicate-padded box sum along ``axis`` (0: D, 1: H, 2: W) of ``[N, D, H, W]``:
    ``dst[clamp(x + k)] += src[x]`` for ``|k| <= r`` (``dst`` overwritten)."""
    if axis == 0:
        _box_adjoint_d(src, dst, r)
    else:
        _box_adjoint_hw(src, dst, r, axis)


@njit(parallel=True, cache=True)
def lcc_energy_terms(sums, mask, has_mask, count, eps, row_energy, coef):
    """Per-voxel LCC energy and the coefficients of its gradient.

    Args:
        sums: ``[N, 5, D, H, W]`` window sums ``S_F, S_M, S_FF, S_MM, S_FM``.
        mask: ``[N or 1, D, H, W]`` weights (read only if ``has_mask``).
        count: window size ``n``; ``eps``: the denominator's floor.
        row_energy: ``[N * D]`` out: the energy of each ``(n, z)`` slab.
        coef: ``[N, 3, D, H, W]`` out: ``a = dE/dS_FM``, ``b = dE/dS_M``, ``c = dE/dS_MM``.
    """
    nn_, _, nd, nh, nw = sums.shape
    nm = mask.shape[0]
    inv = 1.0 / count
    for nz in prange(nn_ * nd):
        n = nz // nd
        z = nz % nd
        mi = n if nm > 1 else 0
        e = 0.0
        for y in range(nh):
            for x in range(nw):
                sf = sums[n, 0, z, y, x]
                sm = sums[n, 1, z, y, x]
                mean_f = sf * inv
                mean_m = sm * inv
                cross = sums[n, 4, z, y, x] - count * mean_f * mean_m
                var_f = sums[n, 2, z, y, x] - count * mean_f * mean_f
                var_m = sums[n, 3, z, y, x] - count * mean_m * mean_m
                den = var_f * var_m + eps
                w = mask[mi, z, y, x] if has_mask else 1.0
                e -= w * cross * cross / den
                d_cross = -w * 2.0 * cross / den
                d_var_m = w * cross * cross * var_f / (den * den)
                coef[n, 0, z, y, x] = d_cross
                coef[n, 1, z, y, x] = -d_cross * mean_f - 2.0 * d_var_m * mean_m
                coef[n, 2, z, y, x] = d_var_m
        row_energy[nz] = e
