"""Autograd wrappers of the numba CPU kernels, each with a hand-written adjoint.

Each function here computes exactly what its PyTorch counterpart computes (same conventions, see
:mod:`learnsim.spatial`), in one pass forward and one pass backward, with no materialised sampling grid:

* :func:`integrate_svf` — scaling and squaring (``T`` fused steps; the ``T`` intermediate fields are the only
  saved state, fewer bytes than autograd keeps for ``grid_sample``: it stores each step's field *and* its grid);
* :func:`warp` — trilinear pull-back warp with border padding, gradients w.r.t. the displacement and the image;
* :func:`smooth` — separable filtering with replicate padding (no gradient: used under the Sobolev smoother's
  identity backward);
* :func:`l2_gradient_energy` — the L2 regulariser and its gradient in one pass;
* :func:`antithetic_pair` — q_v's antithetic pair of samples and its entropy, with the gradients of both in one
  backward pass.

Inputs must be CPU float32/float64 tensors; :func:`learnsim.kernels.backend.use_numba` decides when these run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from learnsim.kernels import lcc_numba as L
from learnsim.kernels import sampling_numba as S
from learnsim.kernels import trilinear_numba as K

__all__ = ["integrate_svf", "warp", "smooth", "l2_gradient_energy", "lcc", "antithetic_pair", "chunks", "Workspace"]


class Workspace:
    """Reusable scratch tensors, keyed by name, shape and dtype.

    A tensor of more than 32 MiB is a fresh ``mmap`` for glibc every time it is allocated, and its first touch
    costs a page fault per 4 KiB (at 128^3 this took longer than the squaring itself). A buffer is handed out
    again only when nothing but the workspace holds it (its reference count), so a graph kept alive (the previous
    iteration's loss, or ``retain_graph=True``) never sees its saved fields overwritten: each key keeps up to
    ``slots`` buffers (two cover the q_v loop, where one iteration's graph lives while the next is built).
    """

    def __init__(self, slots: int = 3) -> None:
        self.slots = int(slots)
        self._buffers: dict[tuple, list[Tensor]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        key = (name, tuple(int(n) for n in shape), dtype)
        pool = self._buffers.setdefault(key, [])
        for t in pool:
            if sys.getrefcount(t) <= 3:  # the pool's list, ``t`` and getrefcount's argument: free
                return t
        t = torch.empty(key[1], dtype=dtype)
        if len(pool) < self.slots:
            pool.append(t)
        return t

    def clear(self) -> None:
        """Drop every buffer (e.g. after a registration, to give the memory back)."""
        self._buffers.clear()


_WORKSPACE = Workspace()


SERIAL_BELOW = 1 << 17  # elements: below this a kernel runs on one thread


def chunks(numel: int | None = None) -> int:
    """Set and return the threads the kernels run on: torch's intra-op thread count, capped by numba's pool, and
    one thread for small work (``numel < SERIAL_BELOW``: on a busy 2-core machine the fork/join of a parallel
    region cost more than a 16^3 squaring step itself, 29-58 s instead of ~2 s for 200 steps)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numel is not None and numel < SERIAL_BELOW:
        n = 1
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _grid(t: Tensor) -> tuple[np.ndarray, ...]:
    """Coordinate vectors of the grid of ``t`` ``[..., D, H, W]`` and ``[0, 1]``, in its dtype (kernel arguments)."""
    dt = np.float64 if t.dtype == torch.float64 else np.float32
    return (*(np.arange(n, dtype=dt) for n in t.shape[-3:]), np.array([0.0, 1.0], dtype=dt))


def _flat(t: Tensor) -> np.ndarray:
    """``[..., D, H, W]`` contiguous tensor -> NumPy view ``[..., D*H*W]`` (the kernels index the grid flat)."""
    return t.detach().reshape(*t.shape[:-3], -1).numpy()


def _channels_last(t: Tensor) -> Tensor:
    """``[B, 3, D, H, W]`` -> contiguous ``[B, D, H, W, 3]``."""
    return t.permute(0, 2, 3, 4, 1).contiguous()


class _Integrate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, no_steps: int) -> Tensor:  # type: ignore[override]
        chunks(v.numel())
        b, _, d, h, w = v.shape
        # the T fields u_0 .. u_{T-1}, channels-last, in one reusable stack: the only state the adjoint needs
        stack = _WORKSPACE.get("squarings", (no_steps + 1, b, d, h, w, 3), v.dtype)
        torch.mul(v.permute(0, 2, 3, 4, 1), 1.0 / 2**no_steps, out=stack[0])
        grid = _grid(v)
        flat = stack.view(no_steps + 1, b, -1).numpy()
        reach = np.empty((no_steps, b * d), dtype=np.float64 if v.dtype == torch.float64 else np.float32)
        for k in range(no_steps):
            K.squaring_forward(flat[k], flat[k + 1], *grid, reach[k])
        ctx.stack = stack
        ctx.reach = reach.max(axis=1) if b * d else np.zeros(no_steps)
        ctx.no_steps = no_steps
        return stack[no_steps].permute(0, 4, 1, 2, 3).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        chunks(grad.numel())
        stack = ctx.stack
        b, d, h, w, _ = stack.shape[1:]
        grid = _grid(stack[0, :, :, :, :, 0])
        flat = stack.view(stack.shape[0], b, -1).numpy()
        # two ping-pong accumulators: step k reads the gradient from one and scatters into the other
        accs = [_WORKSPACE.get(f"squaring_adjoint{i}", (b, d * h * w * 3), stack.dtype) for i in range(2)]
        g = _channels_last(grad).view(b, -1)
        for k in reversed(range(ctx.no_steps)):
            acc = accs[k % 2]
            acc.zero_()
            reach = float(ctx.reach[k])
            # a row reaching past the grid (or a NaN/inf field) scatters anywhere: one slab, run serially
            m = min(int(math.ceil(reach)) + 1, d) if math.isfinite(reach) else d
            K.squaring_backward(flat[k], _np(g), _np(acc), *grid, max(2 * m, 1))
            g = acc
        dv = torch.empty((b, 3, d, h, w), dtype=g.dtype)
        torch.mul(g.view(b, d, h, w, 3).permute(0, 4, 1, 2, 3), 1.0 / 2**ctx.no_steps, out=dv)  # one pass
        return dv, None


def integrate_svf(v: Tensor, no_steps: int) -> Tensor:
    """Displacement of ``exp(v)`` by ``no_steps`` squarings; ``v`` ``[B, 3, D, H, W]`` voxels -> same shape."""
    if no_steps == 0:
        return v
    return _Integrate.apply(v, int(no_steps))


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, disp: Tensor) -> Tensor:  # type: ignore[override]
        chunks(disp.numel())
        image = image.contiguous()
        disp = disp.contiguous()
        out = torch.empty((disp.shape[0], image.shape[1], *disp.shape[2:]), dtype=disp.dtype)
        K.warp_forward(_flat(image), _flat(disp), _flat(out), *_grid(disp))
        ctx.save_for_backward(image, disp)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        image, disp = ctx.saved_tensors
        need_image, need_disp = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = chunks(disp.numel())
        grad_u = torch.empty_like(disp)
        bufs = torch.zeros((n, *image.shape) if need_image else (1, 1, 1, 1, 1, 1), dtype=image.dtype)
        K.warp_backward(
            _flat(image), _flat(disp), _flat(grad.contiguous()), _flat(grad_u), _flat(bufs), bool(need_image), *_grid(disp)
        )
        grad_image = (bufs[0] if n == 1 else bufs.sum(0)) if need_image else None
        return grad_image, (grad_u if need_disp else None)


def warp(image: Tensor, disp: Tensor) -> Tensor:
    """Trilinear pull-back warp with border padding: ``image`` ``[1 or B, C, D, H, W]`` (same dtype as ``disp``),
    ``disp`` ``[B, 3, D, H, W]`` voxels -> ``[B, C, D, H, W]``."""
    return _Warp.apply(image, disp)


def _separable(src: np.ndarray, weights: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Filter ``[N, D, H, W]`` along D, H, then W with ``weights`` (replicate padding): ``src -> a -> b -> a``.
    ``b`` may be ``src`` itself (then overwritten); returns ``a``, which holds the result."""
    K.smooth_axis(src, a, weights, 0)
    K.smooth_axis(a, b, weights, 1)
    K.smooth_axis(b, a, weights, 2)
    return a


@torch.no_grad()
def smooth(field: Tensor, weights: Sequence[float]) -> Tensor:
    """Separable filter of ``[B, C, D, H, W]`` along D, then H, then W (replicate padding), odd-length weights."""
    chunks(field.numel())
    w = np.asarray(weights, dtype=np.float64 if field.dtype == torch.float64 else np.float32)
    shape = field.shape
    src = field.detach().contiguous().reshape(-1, *shape[2:])
    # ``b`` is scratch (reused: no page faults on a fresh 50 MB buffer at 128^3); ``a`` is returned, so fresh
    a, b = torch.empty_like(src), _WORKSPACE.get("smooth", tuple(src.shape), src.dtype)
    _separable(_np(src), w, _np(a), _np(b))
    return a.reshape(shape)


class _L2Gradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, w_reg: float) -> Tensor:  # type: ignore[override]
        chunks(v.numel())
        v = v.contiguous()
        grad = torch.empty_like(v)
        rows = torch.empty(v.shape[0] * v.shape[2], dtype=torch.float64)
        K.l2_gradient(_np(v), float(w_reg), _np(grad), _np(rows))
        ctx.save_for_backward(grad)
        return rows.view(v.shape[0], v.shape[2]).sum(1).to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out.view(-1, 1, 1, 1, 1), None


def l2_gradient_energy(v: Tensor, w_reg: float) -> Tensor:
    """``0.5 w_reg sum`` of squared forward differences along D, H, W; ``v`` ``[B, C, D, H, W]`` -> ``[B]``."""
    return _L2Gradient.apply(v, float(w_reg))


def _box(x: np.ndarray, tmp: np.ndarray, r: int, adjoint: bool) -> np.ndarray:
    """Separable (2r+1)^3 box sum (or its adjoint) of ``[N, D, H, W]``, overwriting ``x``; returns ``tmp``, which
    holds the result."""
    if not adjoint:
        return _separable(x, np.ones(2 * r + 1, dtype=x.dtype), tmp, x)
    for axis, (src, dst) in enumerate(((x, tmp), (tmp, x), (x, tmp))):
        L.box_adjoint_axis(src, dst, r, axis)
    return tmp


class _LCC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fixed: Tensor, warped: Tensor, mask: Tensor | None, radius: int, eps: float) -> Tensor:  # type: ignore[override]
        chunks(warped.numel())
        b, c = warped.shape[:2]
        shape = warped.shape[2:]
        f = fixed.expand(b, *fixed.shape[1:]).reshape(b * c, *shape)
        m = warped.reshape(b * c, *shape)
        # scratch from the workspace (two 84 MB buffers at 128^3, B = 2: fresh ones cost their page faults)
        stats = _WORKSPACE.get("lcc_stats", (b * c, 5, *shape), warped.dtype)
        torch.stack([f, m, f * f, m * m, f * m], dim=1, out=stats)  # [N, 5, D, H, W]
        flat = stats.view(-1, *shape).numpy()
        tmp = _WORKSPACE.get("lcc_tmp", tuple(flat.shape), warped.dtype).numpy()
        summed = _box(flat, tmp, radius, adjoint=False).reshape(stats.shape)
        if mask is None:
            mk, has_mask = np.ones((1, 1, 1, 1), dtype=flat.dtype), False
        else:
            mk = mask.to(warped.dtype)
            # one mask for every item (the kernel broadcasts it), else one per (pair, channel)
            mk = mk.reshape(1, *shape) if mk.shape[0] == 1 and c == 1 else mk.expand(b, c, *shape).reshape(b * c, *shape)
            mk = mk.contiguous().numpy()
            has_mask = True
        rows = np.empty(b * c * shape[0], dtype=np.float64)
        coef = torch.empty((b * c, 3, *shape), dtype=warped.dtype)
        L.lcc_energy_terms(summed, mk, has_mask, float((2 * radius + 1) ** 3), float(eps), rows, coef.numpy())
        ctx.save_for_backward(f, m, coef)
        ctx.radius = radius
        ctx.bc = (b, c)
        return torch.from_numpy(rows.reshape(b, -1).sum(1)).to(warped.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        f, m, coef = ctx.saved_tensors
        b, c = ctx.bc
        shape = f.shape[1:]
        spread = _WORKSPACE.get("lcc_spread", tuple(coef.shape), coef.dtype)
        spread.copy_(coef)
        flat = spread.view(-1, *shape).numpy()
        tmp = _WORKSPACE.get("lcc_adjoint", tuple(flat.shape), coef.dtype).numpy()
        adj = torch.from_numpy(_box(flat, tmp, ctx.radius, adjoint=True)).view(coef.shape)
        gm = f * adj[:, 0] + adj[:, 1] + 2.0 * m * adj[:, 2]
        gm = gm.view(b, c, *shape) * grad.view(b, 1, 1, 1, 1)
        return None, gm, None, None, None


def lcc(fixed: Tensor, warped: Tensor, mask: Tensor | None, radius: int, eps: float = 1e-5) -> Tensor:
    """LCC energy ``[B]`` (see :mod:`learnsim.kernels.lcc_numba`), differentiable w.r.t. ``warped`` only.

    ``fixed`` ``[1 or B, C, D, H, W]`` (no gradient), ``warped`` ``[B, C, D, H, W]``, ``mask`` ``[1 or B, 1, ...]``.
    """
    return _LCC.apply(fixed.detach().contiguous(), warped.contiguous(), mask, int(radius), float(eps))


class _AntitheticPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc: Tensor, log_var: Tensor, u: Tensor, eps: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        chunks(loc.numel())
        b, r = u.shape[:2]
        flat = [t.detach().reshape(b, -1) for t in (loc, log_var, eps)]
        uf = u.detach().reshape(b, r, -1)
        pair = torch.empty((2 * b, *loc.shape[1:]), dtype=loc.dtype)
        partial = np.empty((b, S.NO_CHUNKS, 1 + r * r), dtype=np.float64)
        S.antithetic_forward(*(_np(t) for t in flat[:2]), _np(uf), _np(flat[2]), _np(xi.detach()),
                             _np(pair.view(2 * b, -1)), partial)
        sums = partial.sum(axis=1)  # fixed order over the chunks
        cap = np.eye(r)[None] + sums[:, 1:].reshape(b, r, r)
        ctx.save_for_backward(log_var, u, eps, xi)
        with np.errstate(all="ignore"):  # a diverged q_v (NaN/inf) gives a NaN entropy: the fit reports it
            finite = np.isfinite(cap).all()
            _sign, logdet = np.linalg.slogdet(cap) if finite else (None, np.full(b, np.nan))
            ctx.cinv = np.linalg.inv(cap) if finite else np.full_like(cap, np.nan)
        entropy = torch.from_numpy(0.5 * (sums[:, 0] + logdet)).to(loc.dtype)
        return pair, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pair: Tensor, grad_entropy: Tensor):  # type: ignore[override]
        log_var, u, eps, xi = ctx.saved_tensors
        chunks(log_var.numel())
        b, r = u.shape[:2]
        d_loc, d_log_var, d_u = torch.empty_like(log_var), torch.empty_like(log_var), torch.empty_like(u)
        S.antithetic_backward(_np(log_var.reshape(b, -1)), _np(u.reshape(b, r, -1)), _np(eps.reshape(b, -1)),
                              _np(xi), _np(grad_pair.contiguous().view(2 * b, -1)),
                              _np(grad_entropy.to(torch.float64).contiguous()), ctx.cinv,
                              _np(d_loc.view(b, -1)), _np(d_log_var.view(b, -1)), _np(d_u.view(b, r, -1)))
        return d_loc, d_log_var, d_u, None, None


def antithetic_pair(loc: Tensor, log_var: Tensor, u: Tensor, eps: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
    """q_v's antithetic pair ``cat([mu + n, mu - n])`` ``[2B, *event]`` (``n = sigma * eps + sum_r xi_r u_r``) and
    its entropy up to the constant ``[B]`` (:func:`learnsim.energies.low_rank_entropy`), from the standard normal
    draws ``eps`` ``[B, *event]`` and ``xi`` ``[B, r]``. Gradients flow to ``loc``, ``log_var`` and ``u``."""
    tensors = [t.contiguous() for t in (loc, log_var, u, eps, xi)]
    return _AntitheticPair.apply(*tensors)
