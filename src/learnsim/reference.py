"""A plain re-statement of one q_v iteration, computed the way the original research code computes it.

This module is the **baseline** that :mod:`learnsim.registration` is checked against (same loss, same gradients;
``tests/test_reference.py``) and timed against (``scripts/bench.py``). It is deliberately straightforward, not
deliberately slow: it does what the original LearnSim trainer does per q_v step and nothing more.

What it does differently from the optimised path (and the original does the same way):

* the two antithetic samples go through the pipeline **one after the other** (smoothing, integration, warp,
  features, energy), not as one batch of ``2B``;
* scaling and squaring builds the sampling grid **from the voxel displacement at every squaring step**
  (permute, flip the channel order to grid_sample's ``(x, y, z)``, scale to ``[-1, 1]``, add the identity);
  learnsim instead stays in grid_sample's normalised units for the whole loop;
* the fixed image's features ``a(F)`` are **recomputed for each sample** (the original calls
  ``model(im_fixed, im_moving_warped, mask)`` per sample); learnsim computes them once per fit;
* LCC uses a **full 3D** ``conv3d`` with a ``(2s+1)^3`` ones kernel for the window sums, five calls (one per
  statistic); learnsim uses one batched separable filter;
* the regulariser, Sobolev smoothing (three 1D ``conv3d`` passes, replicate padding, identity backward) and
  the entropy (matrix determinant lemma) are written out directly.

Conventions follow :mod:`learnsim.spatial`: fields ``[B, 3, D, H, W]`` in voxels, channel ``c`` along tensor axis
``2 + c``; pull-back warping with trilinear interpolation, border padding, ``align_corners=True``.

The identity grid is built once per call of :func:`reference_q_v_loss` (the original keeps it as a module
buffer, i.e. builds it once per run; building it per call costs one ``meshgrid`` per iteration, negligible
against 24 squarings and 2 warps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from learnsim.energies import LCC
from learnsim.metric import SimilarityMetric

__all__ = [
    "reference_identity_grid",
    "reference_sampling_grid",
    "reference_integrate_svf",
    "reference_warp",
    "reference_sobolev",
    "reference_features",
    "reference_ssd",
    "reference_lcc",
    "reference_reg_l2",
    "reference_entropy",
    "reference_q_v_terms",
    "reference_q_v_loss",
]


# ------------------------------------------------------------------------------------------------ transformation
def reference_identity_grid(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """grid_sample's identity grid ``[1, D, H, W, 3]`` in normalised ``(x, y, z) = (W, H, D)`` order."""
    d, h, w = shape
    zs = torch.linspace(-1.0, 1.0, d, device=device, dtype=dtype)
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gz, gy, gx = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1).unsqueeze(0)


def reference_sampling_grid(disp: Tensor, identity: Tensor) -> Tensor:
    """Voxel displacement ``[B, 3, D, H, W]`` -> sampling grid ``[B, D, H, W, 3]`` of ``id + disp``.

    Permute channels last, flip ``(D, H, W) -> (x, y, z)``, scale voxels to ``[-1, 1]`` units, add the identity.
    """
    d, h, w = disp.shape[2:]
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1), 2.0 / (d - 1)], device=disp.device, dtype=disp.dtype)
    return identity + disp.permute(0, 2, 3, 4, 1).flip(-1) * scale


def reference_integrate_svf(v: Tensor, no_steps: int, identity: Tensor) -> Tensor:
    """Scaling and squaring in voxel units: ``d = v / 2^T``; ``T`` times ``d <- d + d o (id + d)``; returns ``d``."""
    disp = v / float(2**no_steps)
    for _ in range(no_steps):
        grid = reference_sampling_grid(disp, identity)
        disp = disp + F.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return disp


def reference_warp(image: Tensor, disp: Tensor, identity: Tensor) -> Tensor:
    """Trilinear pull-back warp ``image o (id + disp)``, border padding; ``image`` ``[B, C, D, H, W]``."""
    grid = reference_sampling_grid(disp, identity)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


# ------------------------------------------------------------------------------------------------ Sobolev
class _SobolevIdentityBackward(torch.autograd.Function):
    """Forward: three 1D ``conv3d`` passes with the Sobolev kernel (replicate padding). Backward: identity."""

    @staticmethod
    def forward(ctx, field: Tensor, kernel: Tensor) -> Tensor:  # type: ignore[override]
        c = field.shape[1]
        k = kernel.numel()
        r = k // 2
        k_d = kernel.view(1, 1, k, 1, 1).repeat(c, 1, 1, 1, 1)
        k_h = kernel.view(1, 1, 1, k, 1).repeat(c, 1, 1, 1, 1)
        k_w = kernel.view(1, 1, 1, 1, k).repeat(c, 1, 1, 1, 1)
        out = F.conv3d(F.pad(field, (0, 0, 0, 0, r, r), mode="replicate"), k_d, groups=c)
        out = F.conv3d(F.pad(out, (0, 0, r, r, 0, 0), mode="replicate"), k_h, groups=c)
        out = F.conv3d(F.pad(out, (r, r, 0, 0, 0, 0), mode="replicate"), k_w, groups=c)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def reference_sobolev(field: Tensor, kernel: Tensor) -> Tensor:
    """``S * field`` forward, identity backward; ``kernel`` is the 1D Sobolev kernel ``[2s + 1]``."""
    return _SobolevIdentityBackward.apply(field, kernel.to(field.dtype))


# ------------------------------------------------------------------------------------------------ metric
def reference_features(metric: SimilarityMetric, image: Tensor) -> Tensor:
    """``a(image)`` written out: replicate-padded 3x3x3 convs, LeakyReLU, then the 1x1 aggregation (no bias)."""
    enc = metric.encoder
    if enc is None:
        return image
    x = image
    for conv in enc.convs:
        p = conv.weight.shape[-1] // 2
        x = F.conv3d(F.pad(x, (p,) * 6, mode="replicate"), conv.weight, conv.bias)
        x = F.leaky_relu(x, enc.act.negative_slope)
    return F.conv3d(x, enc.aggregation.weight)


def _masked_sum(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        x = x * mask
    return x.sum(dim=(1, 2, 3, 4))


def reference_ssd(z_fixed: Tensor, z_warped: Tensor, mask: Tensor | None) -> Tensor:
    """``0.5 * sum_mask (a(F) - a(M o phi))^2``, ``[B]``."""
    return 0.5 * _masked_sum((z_fixed - z_warped) ** 2, mask)


def reference_lcc(
    z_fixed: Tensor, z_warped: Tensor, mask: Tensor | None, radius: int = 1, window: Tensor | None = None
) -> Tensor:
    """``-sum_mask cross^2 / (var_F var_M + 1e-5)`` with full 3D window convolutions, replicate padding; ``[B]``.

    ``window``: optional 1D window weights (a learnt LCC window); the 3D kernel is their outer product.
    """
    size = 2 * radius + 1
    if window is None:
        kernel = torch.ones(1, 1, size, size, size, device=z_warped.device, dtype=z_warped.dtype)
    else:
        w = window.to(z_warped.dtype)
        kernel = (w.view(-1, 1, 1) * w.view(1, -1, 1) * w.view(1, 1, -1)).view(1, 1, size, size, size)
    n = kernel.sum()
    pad = (radius,) * 6
    z_fixed = z_fixed.expand_as(z_warped)
    f = F.pad(z_fixed, pad, mode="replicate")
    m = F.pad(z_warped, pad, mode="replicate")
    sum_f = F.conv3d(f, kernel)
    sum_m = F.conv3d(m, kernel)
    sum_ff = F.conv3d(f * f, kernel)
    sum_mm = F.conv3d(m * m, kernel)
    sum_fm = F.conv3d(f * m, kernel)
    mean_f = sum_f / n
    mean_m = sum_m / n
    cross = sum_fm - mean_f * mean_m * n
    var_f = sum_ff - mean_f * mean_f * n
    var_m = sum_mm - mean_m * mean_m * n
    return -_masked_sum(cross * cross / (var_f * var_m + 1e-5), mask)


def _energy(metric: SimilarityMetric, z_fixed: Tensor, z_warped: Tensor, mask: Tensor | None) -> Tensor:
    energy = metric.energy
    if isinstance(energy, LCC):
        window = energy.window.clamp_min(1e-3) if energy.learnable_window else None
        return reference_lcc(z_fixed, z_warped, mask, energy.radius, window)
    return reference_ssd(z_fixed, z_warped, mask)


# ------------------------------------------------------------------------------------------------ regulariser
def reference_reg_l2(v: Tensor, w_reg: float) -> Tensor:
    """``0.5 * w_reg * sum`` of squared forward differences along D, H, W (last difference 0); ``[B]``."""
    dd = v[:, :, 1:, :, :] - v[:, :, :-1, :, :]
    dh = v[:, :, :, 1:, :] - v[:, :, :, :-1, :]
    dw = v[:, :, :, :, 1:] - v[:, :, :, :, :-1]
    return (
        0.5
        * w_reg
        * ((dd**2).sum(dim=(1, 2, 3, 4)) + (dh**2).sum(dim=(1, 2, 3, 4)) + (dw**2).sum(dim=(1, 2, 3, 4)))
    )


def reference_entropy(log_var: Tensor, u: Tensor) -> Tensor:
    """``0.5 log det(diag(sigma^2) + U U^T)`` by the determinant lemma; ``log_var`` ``[B, ...]``, ``u`` ``[B, r, ...]``.

    Rank 1: ``0.5 [sum log sigma^2 + log(1 + sum (u / sigma)^2)]``; rank ``r``: the ``r x r`` capacitance logdet.
    """
    b, r = u.shape[:2]
    sum_log_var = log_var.reshape(b, -1).sum(1)
    scaled = (u / torch.exp(0.5 * log_var).unsqueeze(1)).reshape(b, r, -1)
    if r == 1:
        return 0.5 * (sum_log_var + torch.log(1.0 + (scaled**2).sum(dim=(1, 2))))
    capacitance = torch.eye(r, device=u.device, dtype=u.dtype) + scaled @ scaled.transpose(1, 2)
    return 0.5 * (sum_log_var + torch.logdet(capacitance))


# ------------------------------------------------------------------------------------------------ the q_v loss
def reference_q_v_terms(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None,
    mu: Tensor,
    log_var: Tensor,
    u: Tensor,
    eps: Tensor,
    xi: Tensor,
    metric: SimilarityMetric,
    w_reg: float,
    no_steps: int,
    sobolev_kernel: Tensor | None,
    noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """The q_v loss's terms per pair: ``data`` and ``reg`` (means over the antithetic pair) and ``entropy``, each ``[B]``.

    See :func:`reference_q_v_loss` for the arguments.
    """
    b = moving.shape[0]
    shape = tuple(moving.shape[2:])
    identity = reference_identity_grid(shape, moving.device, mu.dtype)
    # the antithetic pair mu +/- (sigma * eps + sum_r xi_r u_r)
    r = u.shape[1]
    perturbation = torch.exp(0.5 * log_var) * eps + (xi.view(b, r, 1, 1, 1, 1) * u).sum(1)
    samples = (mu + perturbation, mu - perturbation)
    if noise is not None:
        noise = noise.reshape(2, b, *noise.shape[-4:])
    data = torch.zeros(b, device=mu.device, dtype=mu.dtype)
    reg = torch.zeros(b, device=mu.device, dtype=mu.dtype)
    for k, v_unsmoothed in enumerate(samples):
        v = reference_sobolev(v_unsmoothed, sobolev_kernel) if sobolev_kernel is not None else v_unsmoothed
        disp = reference_integrate_svf(v, no_steps, identity)
        if noise is not None:
            disp = disp + noise[k]
        warped = reference_warp(moving, disp, identity)
        z_fixed = reference_features(metric, fixed)  # per sample, as the original's model(F, M o phi, mask)
        z_warped = reference_features(metric, warped)
        data = data + _energy(metric, z_fixed, z_warped, mask).to(mu.dtype) / 2.0
        reg = reg + reference_reg_l2(v, w_reg) / 2.0
    return {"data": data, "reg": reg, "entropy": reference_entropy(log_var, u)}


def reference_q_v_loss(*args: Any, **kwargs: Any) -> Tensor:
    """One q_v iteration's loss per pair, ``[B]``: ``mean_pair[data + reg] - entropy``; the arguments of
    :func:`reference_q_v_terms`.

    Args:
        fixed: ``[1 or B, 1, D, H, W]`` fixed image in [0, 1].
        moving: ``[B, 1, D, H, W]`` moving images in [0, 1].
        mask: ``[1 or B, 1, D, H, W]`` 0/1 fixed-image mask (energies summed inside it) or None.
        mu, log_var: ``[B, 3, D, H, W]`` q_v mean and log of the diagonal variance (voxels, dense SVF).
        u: ``[B, r, 3, D, H, W]`` low-rank factors.
        eps: ``[B, 3, D, H, W]`` standard normal draws.
        xi: ``[B, r]`` standard normal draws.
        metric: a :class:`~learnsim.metric.SimilarityMetric` (its weights and energy settings are read; its
            modules are not called).
        w_reg: regulariser weight.
        no_steps: squarings (12 in the original).
        sobolev_kernel: the 1D Sobolev kernel ``[2s + 1]`` or None (smoothing off).
        noise: ``[2, B, 3, D, H, W]`` (or ``[2B, 3, D, H, W]``) uniform coordinate noise **in voxels**, already
            scaled to ``U(-a, a)``, added to the displacement of sample ``k`` before warping; None at test time.
    Returns:
        ``[B]``.
    """
    t = reference_q_v_terms(*args, **kwargs)
    return t["data"] + t["reg"] - t["entropy"]
