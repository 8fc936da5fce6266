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


@njit(parallel=True, cache=True)
def box_adjoint_axis(src, dst, r, axis):
    """Adjoint of the replicate-padded box sum along ``axis`` (0: D, 1: H, 2: W) of ``[N, D, H, W]``:
    ``dst[clamp(x + k)] += src[x]`` for ``|k| <= r`` (``dst`` overwritten)."""
    nn_, nd, nh, nw = src.shape
    if axis == 0:
        # lines along D: parallel over (n, y)
        for ny in prange(nn_ * nh):
            n = ny // nh
            y = ny % nh
            for z in range(nd):
                for x in range(nw):
                    dst[n, z, y, x] = 0.0
            for z in range(nd):
                for k in range(-r, r + 1):
                    zz = min(max(z + k, 0), nd - 1)
                    for x in range(nw):
                        dst[n, zz, y, x] += src[n, z, y, x]
    else:
        for nz in prange(nn_ * nd):
            n = nz // nd
            z = nz % nd
            if axis == 1:
                for y in range(nh):
                    for x in range(nw):
                        dst[n, z, y, x] = 0.0
                for y in range(nh):
                    for k in range(-r, r + 1):
                        yy = min(max(y + k, 0), nh - 1)
                        for x in range(nw):
                            dst[n, z, yy, x] += src[n, z, y, x]
            else:
                for y in range(nh):
                    for x in range(nw):
                        dst[n, z, y, x] = 0.0
                    for x in range(nw):
                        v = src[n, z, y, x]
                        for k in range(-r, r + 1):
                            dst[n, z, y, min(max(x + k, 0), nw - 1)] += v


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
