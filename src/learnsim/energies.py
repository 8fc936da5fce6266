"""Energies: data terms (SSD, LCC), the L2 gradient regulariser and the low-rank Gaussian entropy.

Functional forms first (plain functions on tensors), thin ``nn.Module`` wrappers after them. All energies are
**sums** over voxels (as in the paper), returned per batch element as ``[B]``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor, nn

from learnsim.kernels.backend import use_numba
from learnsim.spatial import separable_filter

__all__ = [
    "EnergyKind",
    "ssd",
    "lcc",
    "lcc_terms",
    "l2_gradient_energy",
    "low_rank_entropy",
    "entropy_constant",
    "SSD",
    "StudentT",
    "student_t_energy",
    "student_t_terms",
    "LCC",
    "RegLossL2",
]


class EnergyKind(str, Enum):
    """The data term a metric compares features with; it selects the paper's settings (:mod:`learnsim.defaults`)."""

    SSD = "ssd"
    LCC = "lcc"


def _apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


def ssd(fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of squared differences ``0.5 * sum_mask (F - M o phi)^2``.

    Args:
        fixed: ``[B, C, D, H, W]`` (or broadcastable to ``warped``), intensities or feature maps.
        warped: ``[B, C, D, H, W]``.
        mask: ``[B, 1, D, H, W]`` 0/1 weights or None (all voxels).
    Returns:
        ``[B]``.
    """
    diff = (fixed - warped) ** 2
    return 0.5 * _apply_mask(diff, mask).flatten(1).sum(1)


def lcc_terms(fixed: Tensor, warped: Tensor, radius: int = 1, kernel: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Voxel-wise ``cross^2 / (var_F * var_M + eps)`` of the local cross-correlation, ``[B, C, D, H, W]``.

    Window ``(2 radius + 1)^3`` with replicate padding. Window *sums* give cross and variances, window *means*
    give the centring: ``cross = sum(F M) - n mean(F) mean(M)``, ``var_F = sum(F^2) - n mean(F)^2``.

    Args:
        kernel: optional 1D window of length ``2 radius + 1`` (ones by default; a learnt window for CNN_LCC).
    """
    # The window statistics cancel catastrophically (sum(x^2) - n mean^2) in reduced precision: always fp32.
    with torch.autocast(fixed.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(fixed.dtype, warped.dtype), torch.float32)
        return _lcc_terms_fp32(fixed.to(dtype), warped.to(dtype), radius, kernel, eps)


def _lcc_terms_fp32(fixed: Tensor, warped: Tensor, radius: int, kernel: Tensor | None, eps: float) -> Tensor:
    size = 2 * radius + 1
    if kernel is None:
        kernel = [1.0] * size  # host floats: the fast shifted-sum path, no device reads
        n: Tensor | float = float(size**3)
    else:
        if kernel.numel() != size:
            raise ValueError(f"lcc: kernel length {kernel.numel()} != 2*radius+1 = {size}")
        n = kernel.sum() ** 3
    if fixed.shape[0] != warped.shape[0]:
        fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
    # one batched filter call over the five statistics
    c = fixed.shape[1]
    stats = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    sums = separable_filter(stats, kernel)
    s_f, s_m, s_ff, s_mm, s_fm = sums.split(c, dim=1)
    mean_f, mean_m = s_f / n, s_m / n
    cross = s_fm - n * mean_f * mean_m
    var_f = s_ff - n * mean_f * mean_f
    var_m = s_mm - n * mean_m * mean_m
    return cross * cross / (var_f * var_m + eps)


def lcc(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, radius: int = 1, kernel: Tensor | None = None) -> Tensor:
    """Local cross-correlation energy ``-sum_mask cross^2 / (var_F var_M + 1e-5)``; ``[B]``."""
    if kernel is None and not fixed.requires_grad and fixed.dtype == warped.dtype and use_numba(fixed, warped):
        from learnsim.kernels import ops

        return ops.lcc(fixed, warped, mask, radius)
    return -_apply_mask(lcc_terms(fixed, warped, radius, kernel), mask).flatten(1).sum(1)


def l2_gradient_energy(v: Tensor, w_reg: float) -> Tensor:
    """``0.5 * w_reg * sum`` of squared forward differences of all components along all axes; ``[B]``."""
    if use_numba(v) and v.dim() == 5:
        from learnsim.kernels import ops

        return ops.l2_gradient_energy(v, w_reg)
    total = sum((torch.diff(v, dim=a) ** 2).flatten(1).sum(1) for a in (2, 3, 4))
    return 0.5 * w_reg * total


def low_rank_entropy(log_var: Tensor, u: Tensor) -> Tensor:
    """Entropy of ``N(mu, diag(sigma^2) + U U^T)`` up to its additive constant: ``0.5 log det Sigma``.

    By the matrix determinant lemma ``log det Sigma = sum log sigma^2 + log det(I_r + U^T diag(sigma^-2) U)``;
    for rank 1 the second term is ``log(1 + sum (u / sigma)^2)``.

    Args:
        log_var: ``[B, *event]`` log of the diagonal variances.
        u: ``[B, r, *event]`` low-rank factors (rank ``r``).
    Returns:
        ``[B]``. The full entropy is this plus ``0.5 * n * (1 + log 2 pi)`` with ``n`` the event size.
    """
    b, r = u.shape[:2]
    scaled = (u * torch.exp(-0.5 * log_var).unsqueeze(1)).reshape(b, r, -1)
    capacitance = torch.eye(r, device=u.device, dtype=u.dtype) + scaled @ scaled.transpose(1, 2)
    return 0.5 * (log_var.flatten(1).sum(1) + torch.logdet(capacitance))


def entropy_constant(numel: int) -> float:
    """The constant ``0.5 * n * (1 + log 2 pi)`` dropped by :func:`low_rank_entropy`."""
    return 0.5 * numel * (1.0 + math.log(2 * math.pi))


class SSD(nn.Module):
    """SSD data term as a module: ``forward(fixed, warped, mask) -> [B]``.

    Args:
        weight: multiplies the energy: the precision ``1 / sigma_n^2`` of the Gaussian likelihood the energy is the
            negative log of (1, the original's, means a noise std of 1 on [0, 1] images: a weak likelihood next to
            ``w_reg`` and the entropy; see the docs/results.md, "Energy scales").
    """

    kind = EnergyKind.SSD
    radius = 0

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        e = ssd(fixed, warped, mask)
        return e if self.weight == 1.0 else self.weight * e


def student_t_terms(fixed: Tensor, warped: Tensor, precision: float, nu: float) -> Tensor:
    """Voxel-wise ``(nu + 1) / (2 w) log(1 + w r^2 / nu)`` (``0.5 r^2`` for ``nu = inf``), ``r = F - M o phi``: the
    Student-t term per unit weight, ``[B, C, D, H, W]`` (:func:`student_t_energy` sums it, times ``weight``)."""
    r2 = (fixed - warped) ** 2
    if math.isinf(nu):
        return 0.5 * r2
    return torch.log1p(r2 * (precision / nu)) * (0.5 * (nu + 1.0) / precision)


def student_t_energy(fixed: Tensor, warped: Tensor, mask: Tensor | None, weight: float, precision: float,
                     nu: float) -> Tensor:
    """Student-t data term ``(weight / w) (nu + 1) / 2 sum_mask log(1 + w r^2 / nu)``, ``r = F - M o phi``; ``[B]``.

    ``w`` (``precision``) is the noise's precision, ``nu`` its degrees of freedom; ``weight`` is what the term
    weighs at small residuals: ``~ 0.5 weight r^2`` there, so ``weight = w`` is the Student-t likelihood itself and
    ``weight = alpha w`` its virtually decimated form (:mod:`learnsim.likelihood`). ``nu = inf`` is SSD exactly.
    """
    if math.isinf(nu):
        return weight * ssd(fixed, warped, mask)
    return weight * _apply_mask(student_t_terms(fixed, warped, precision, nu), mask).flatten(1).sum(1)


class StudentT(SSD):
    """Student-t noise on the residual of SSD's features (robust SSD): ``forward(fixed, warped, mask) -> [B]``.

    Equal to :class:`SSD` with the same ``weight`` as ``nu -> inf``; voxels with residuals far beyond the noise
    scale ``1 / sqrt(precision)`` weigh ``(nu + 1) / (nu + precision r^2)`` of what SSD gives them
    (:func:`learnsim.likelihood.student_t_weights`). Its settings (SSD's: ``kind`` is SSD) are the paper's SSD ones.

    Args:
        weight: the precision q_v sees at small residuals (``alpha w``; see :func:`student_t_energy`).
        nu: degrees of freedom (> 0; ``inf`` is SSD).
        precision: the noise precision ``w`` (None: ``weight``).
    """

    def __init__(self, weight: float = 1.0, nu: float = math.inf, precision: float | None = None) -> None:
        super().__init__(weight)
        self.nu = float(nu)
        self.precision = float(weight if precision is None else precision)
        if not self.nu > 0:
            raise ValueError(f"metric.energy.nu must be > 0 (inf: SSD); got {nu}")
        if not (math.isfinite(self.precision) and self.precision > 0):
            raise ValueError(f"metric.energy.precision must be a finite number > 0; got {precision}")

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return student_t_energy(fixed, warped, mask, self.weight, self.precision, self.nu)


class LCC(nn.Module):
    """LCC data term as a module with window radius ``s`` (1 in the original: 3x3x3).

    Args:
        radius: window half-width.
        learnable_window: learn the separable window weights (initialised to ones; kept positive).
        weight: multiplies the energy (see :class:`SSD`).
    """

    kind = EnergyKind.LCC

    def __init__(self, radius: int = 1, learnable_window: bool = False, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.radius = int(radius)
        self.learnable_window = bool(learnable_window)
        window = torch.ones(2 * self.radius + 1)
        if self.learnable_window:
            self.window = nn.Parameter(window)
        else:
            self.register_buffer("window", window, persistent=False)

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        window = self.window.clamp_min(1e-3) if self.learnable_window else None
        e = lcc(fixed, warped, mask, self.radius, window)
        return e if self.weight == 1.0 else self.weight * e


class RegLossL2(nn.Module):
    """The original ``RegLoss_L2`` with ``GradientOperator``: ``0.5 * w_reg * ||grad v||^2``."""

    def __init__(self, w_reg: float = 1.8) -> None:
        super().__init__()
        self.w_reg = float(w_reg)

    def forward(self, v: Tensor) -> Tensor:
        return l2_gradient_energy(v, self.w_reg)
