"""CPU kernels (numba) for the q_v sample and entropy: the reparameterised antithetic pair and the low-rank
Gaussian's entropy, forward and adjoint in one pass each.

q_v is ``N(mu, diag(sigma^2) + U U^T)`` with ``sigma^2 = exp(log_var)`` and ``U`` of rank ``r`` (the columns
``u_q``). One antithetic pair is ``mu +/- n`` with ``n = sigma * eps + sum_q xi_q u_q``; the entropy (up to its
constant) is ``H = 0.5 (sum log_var + log det C)`` with the capacitance ``C = I_r + S S^T``, ``S_q = u_q / sigma``
(matrix determinant lemma). Its derivatives, with ``T = C^-1 S``:

* ``dH/dlog_var_i = 0.5 - 0.5 sum_q T_qi S_qi``;
* ``dH/du_qi = T_qi / sigma_i``.

Arrays are flat per batch element: ``[B, N]`` (``N`` = the event's size), ``u`` ``[B, r, N]``. Each batch
element's voxels are cut into a fixed number of chunks (independent of the thread count), whose partial sums are
added in a fixed order: the result is deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from learnsim.kernels.trilinear_numba import FASTMATH

__all__ = ["antithetic_forward", "antithetic_backward", "NO_CHUNKS"]

NO_CHUNKS = 64  # chunks per batch element for the partial sums (fixed: results do not depend on the threads)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def antithetic_forward(loc, log_var, u, eps, xi, out, partial):
    """``out[b] = mu + n``, ``out[B + b] = mu - n``, and the entropy's partial sums.

    Args:
        loc, log_var, eps: ``[B, N]``; ``u``: ``[B, r, N]``; ``xi``: ``[B, r]``.
        out: ``[2 B, N]`` receives the pair (the ``+`` halves first, as ``torch.cat([v1, v2])``).
        partial: ``[B, NO_CHUNKS, 1 + r * r]`` float64 receives, per chunk, ``sum log_var`` and ``S S^T``.
    """
    nb, n = loc.shape
    r = u.shape[1]
    nchunks = partial.shape[1]
    step = (n + nchunks - 1) // nchunks
    half = loc.dtype.type(0.5)
    for item in prange(nb * nchunks):
        b = item // nchunks
        k = item % nchunks
        acc = partial[b, k]
        acc[:] = 0.0
        for i in range(k * step, min(n, (k + 1) * step)):
            lv = log_var[b, i]
            sigma = np.exp(half * lv)
            noise = sigma * eps[b, i]
            for q in range(r):
                noise += xi[b, q] * u[b, q, i]
            out[b, i] = loc[b, i] + noise
            out[nb + b, i] = loc[b, i] - noise
            acc[0] += lv
            inv = 1.0 / np.float64(sigma)
            for q in range(r):
                sq = u[b, q, i] * inv
                for p in range(r):
                    acc[1 + q * r + p] += sq * (u[b, p, i] * inv)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def antithetic_backward(log_var, u, eps, xi, grad_out, grad_h, cinv, d_loc, d_log_var, d_u):
    """Adjoint of :func:`antithetic_forward` plus the entropy's: gradients w.r.t. ``loc``, ``log_var``, ``u``.

    Args:
        grad_out: ``[2 B, N]`` gradient w.r.t. the pair; ``grad_h``: ``[B]`` gradient w.r.t. the entropy.
        cinv: ``[B, r, r]`` the inverse capacitance ``C^-1`` of each batch element.
        d_loc, d_log_var: ``[B, N]``; ``d_u``: ``[B, r, N]`` receive the gradients (overwritten).
    """
    nb, n = log_var.shape
    r = u.shape[1]
    nchunks = min(n, 4 * NO_CHUNKS)  # no reduction here: the chunks only balance the threads
    step = (n + nchunks - 1) // nchunks
    half = log_var.dtype.type(0.5)
    for item in prange(nb * nchunks):
        b = item // nchunks
        k = item % nchunks
        gh = grad_h[b]
        for i in range(k * step, min(n, (k + 1) * step)):
            g1 = grad_out[b, i]
            g2 = grad_out[nb + b, i]
            dn = g1 - g2
            d_loc[b, i] = g1 + g2
            lv = log_var[b, i]
            sigma = np.exp(half * lv)
            inv = 1.0 / sigma
            ts = 0.0
            for q in range(r):
                tq = 0.0
                for p in range(r):
                    tq += cinv[b, q, p] * (u[b, p, i] * inv)
                ts += tq * (u[b, q, i] * inv)
                d_u[b, q, i] = dn * xi[b, q] + gh * tq * inv
            d_log_var[b, i] = half * dn * eps[b, i] * sigma + gh * (half - half * ts)
