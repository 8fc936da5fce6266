r"""The likelihood's noise model learnt from the pairs: the precision by variational Bayes, and Student-t noise.

Every data term of learnsim is the negative log of a likelihood, ``E = w Q`` with ``w`` the precision
(``metric.energy.weight``) and ``Q = 0.5 sum_mask r^2`` a quadratic form in a residual ``r`` (docs/method.md,
"The learnt likelihood"):

* SSD: ``r = a(F) - a(M o phi)`` (features; intensities for the baseline), ``Q = E / w``.
* LCC: the energy is ``-w sum_mask cc`` with ``cc`` in [0, 1] the squared local correlation. Up to a constant it
  is ``w sum_mask (1 - cc) = 0.5 w sum_mask r~^2`` with ``r~^2 = 2 (1 - cc)``: ``1 - cc`` is the share of the
  window's variance that the best local linear fit of one image on the other leaves unexplained, and for
  standardised patches ``||f^ - m^||^2 = 2 (1 - corr)``. So ``Q = n_m + E / w`` (``n_m`` = the mask's sum) and the
  same Gaussian algebra holds with ``r~`` for ``r``.

Precision by variational Bayes (Simpson et al., NeuroImage 2012)
---------------------------------------------------------------
A Gamma prior ``w ~ Gamma(a0, b0)`` and a likelihood raised to the power ``alpha`` (virtual decimation: ``alpha n``
effectively independent voxels of ``n``, for spatially correlated residuals) give the closed-form update

    q(w) = Gamma(a0 + alpha N / 2,  b0 + alpha sum_k E_{q_v}[Q_k]),     N = sum_k n_k,

and q_v sees the data term ``alpha E[w] Q``: the *effective* precision ``alpha E[w]`` is what
``metric.energy.weight`` holds while q_v is fitted. With a weak prior ``E[w] ~= N / (2 sum Q) = 1 / mean(r^2)``, the
maximum-likelihood precision of the residuals; a point-mass prior (``strength = inf``) keeps ``E[w]`` at its mean.
``alpha`` is either given or estimated from the residual (:func:`decimation_factor`).

Student-t noise
---------------
``-log p(r) = (nu + 1) / 2 sum_mask log(1 + w r^2 / nu)`` per voxel (scale ``1 / sqrt(w)``, ``nu`` degrees of
freedom): the Gaussian as ``nu -> inf``; large residuals (a lesion, a label-protocol mismatch, a missing
structure) are down-weighted by ``E[tau_x] = (nu + 1) / (nu + w r_x^2)`` instead of dragging the field.
:class:`learnsim.energies.StudentT` is this energy; here ``nu`` and ``w`` are fitted to pooled residuals by
maximum likelihood (EM on the precision, a 1-D search on ``log nu``), from a histogram of the squared residuals
(:class:`ResidualHistogram`) so that thousands of pairs cost a few hundred numbers each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PrecisionPrior",
    "LikelihoodLearning",
    "PrecisionEstimate",
    "ResidualHistogram",
    "residual_quadratic",
    "squared_residual_map",
    "decimation_factor",
    "student_t_weights",
    "fit_student_t",
    "parse_data_weight",
]


# ------------------------------------------------------------------------------------------------ residuals
def residual_quadratic(metric: Any, energy: Tensor, mask: Tensor | None, numel: int) -> Tensor:
    """``Q = 0.5 sum_mask r^2`` per pair ``[B]`` from the metric's energy ``[B]`` (module docstring).

    Args:
        metric: the :class:`~learnsim.metric.SimilarityMetric` that computed ``energy``.
        energy: its energy per pair, weight included.
        mask: the mask it was summed in (``[1 or B, 1, D, H, W]`` weights) or None.
        numel: voxels per image (the mask's sum when ``mask`` is None).
    """
    from learnsim.energies import EnergyKind, StudentT

    e = energy / float(metric.energy.weight)
    if isinstance(metric.energy, StudentT):
        raise TypeError("residual_quadratic: a Student-t energy is not quadratic; use squared_residual_map")
    if metric.energy_kind is EnergyKind.SSD:
        return e
    n = float(numel) if mask is None else mask.flatten(1).sum(1).to(e.dtype)
    return (n + e).clamp_min(0.0)


def squared_residual_map(metric: Any, feat_fixed: Tensor, feat_warped: Tensor) -> Tensor:
    """Voxel-wise squared residual ``r_x^2`` ``[B, 1, D, H, W]`` of the noise model (module docstring).

    SSD: ``(a(F) - a(M o phi))^2``; LCC: ``2 (1 - cc_x)`` (clamped at 0). Features as the metric compares them.
    """
    from learnsim.energies import EnergyKind, lcc_terms

    if metric.energy_kind is EnergyKind.SSD:
        ff = feat_fixed if feat_fixed.shape[0] == feat_warped.shape[0] else feat_fixed.expand_as(feat_warped)
        return (ff - feat_warped).pow(2)
    window = metric.energy.window.clamp_min(1e-3) if metric.energy.learnable_window else None
    cc = lcc_terms(feat_fixed, feat_warped, metric.energy.radius, window)
    return (2.0 * (1.0 - cc)).clamp_min(0.0)


def decimation_factor(residual: Tensor, mask: Tensor | None = None, floor: float = 1e-3) -> Tensor:
    """Virtual decimation ``alpha`` per pair ``[B]`` from a residual map ``[B, 1, D, H, W]`` (signed values).

    For a residual whose correlation decays as ``rho_d^|k|`` along axis ``d`` (lag-1 autocorrelation ``rho_d``),
    ``n`` voxels carry the information of ``n prod_d (1 - rho_d) / (1 + rho_d)`` independent ones (the effective
    sample size of an AR(1) sequence, one factor per axis). White noise gives 1; a smoother residual less. The
    autocorrelations are taken inside ``mask`` (both voxels of a lag pair weighted), after removing the masked mean.

    Returns:
        ``alpha`` in ``[floor, 1]`` per pair.
    """
    r = residual.float()
    m = torch.ones_like(r[:, :1]) if mask is None else mask.float().expand(r.shape[0], 1, *r.shape[2:])
    msum = m.flatten(1).sum(1).clamp_min(1e-12)
    mean = (r * m).flatten(1).sum(1) / msum
    r = (r - mean.view(-1, 1, 1, 1, 1)) * m
    var = r.pow(2).flatten(1).sum(1) / msum
    alpha = torch.ones_like(var)
    for axis in (2, 3, 4):
        n = r.shape[axis]
        if n < 2:
            continue
        a, b = r.narrow(axis, 0, n - 1), r.narrow(axis, 1, n - 1)
        ma, mb = m.narrow(axis, 0, n - 1), m.narrow(axis, 1, n - 1)
        w = (ma * mb).flatten(1).sum(1).clamp_min(1e-12)
        rho = ((a * b).flatten(1).sum(1) / w) / var.clamp_min(1e-30)
        rho = rho.clamp(0.0, 0.999)  # anti-correlation (rare, from interpolation) counts as independent
        alpha = alpha * (1 - rho) / (1 + rho)
    return alpha.clamp(floor, 1.0)


# ------------------------------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class PrecisionPrior:
    """``Gamma(a0, b0)`` on the likelihood precision, as a mean and a strength.

    Attributes:
        mean: ``a0 / b0`` (the precision before any data; learnsim starts from the metric's own weight).
        strength: ``a0``, in voxel-equivalents (``2 a0`` voxels of pseudo-data); ``inf``: a point mass at ``mean``.
    """

    mean: float = 1.0
    strength: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.mean > 0):
            raise ValueError(f"likelihood.prior_mean must be a finite number > 0; got {self.mean}")
        if not (self.strength > 0):  # inf allowed: a point mass
            raise ValueError(f"likelihood.prior_strength must be > 0 (inf: a point mass); got {self.strength}")

    def posterior(self, quad: Tensor | float, count: Tensor | float, alpha: Tensor | float = 1.0) -> tuple[Any, Any]:
        """``(a, b)`` of ``q(w) = Gamma(a0 + alpha count / 2, b0 + alpha quad)`` (``quad = sum Q``, ``count = sum n``)."""
        if math.isinf(self.strength):
            return math.inf, math.inf
        a0, b0 = self.strength, self.strength / self.mean
        return a0 + alpha * count / 2, b0 + alpha * quad

    def expected(self, quad: Tensor | float, count: Tensor | float, alpha: Tensor | float = 1.0) -> Any:
        """``E[w] = a / b`` under the posterior (``mean`` for a point mass)."""
        if math.isinf(self.strength):
            return quad * 0 + self.mean if isinstance(quad, Tensor) else self.mean
        a, b = self.posterior(quad, count, alpha)
        return a / b


@dataclass
class PrecisionEstimate:
    """Where a learnt precision settled: the effective weight ``alpha E[w]`` and its parts, per pair ``[B]``."""

    weight: Tensor
    expected: Tensor
    alpha: Tensor
    history: list[tuple[int, int, list[float]]] = field(default_factory=list)  # (level, iteration, weights)

    def as_dict(self) -> dict[str, Any]:
        return {"data_weight": self.weight.tolist(), "precision": self.expected.tolist(),
                "decimation": self.alpha.tolist(),
                "history": [{"level": lv, "iteration": it, "data_weight": w} for lv, it, w in self.history]}


@dataclass(frozen=True)
class LikelihoodLearning:
    """How the precision is learnt inside one q_v fit (``data_weight="auto"``) or over training pairs.

    Attributes:
        prior: the Gamma prior (its mean defaults to the metric's weight where learnsim builds it).
        decimation: ``alpha``: a number in (0, 1], or ``"auto"`` (:func:`decimation_factor` of the residual).
        update_every: q_v iterations between updates inside a fit (and one at the start of every level).
        samples: antithetic pairs of q_v samples averaged for ``E_{q_v}[Q]`` (the posterior mean's residual
            alone would ignore q_v's spread).
    """

    prior: PrecisionPrior = PrecisionPrior()
    decimation: float | str = 1.0
    update_every: int = 25
    samples: int = 1

    def __post_init__(self) -> None:
        d = self.decimation
        if not (d == "auto" or (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1)):
            raise ValueError(f"likelihood.decimation must be 'auto' or a number in (0, 1]; got {d!r}")
        if not (isinstance(self.update_every, int) and not isinstance(self.update_every, bool)
                and self.update_every >= 1):
            raise ValueError(f"likelihood.update_every must be an integer >= 1; got {self.update_every!r}")
        if not (isinstance(self.samples, int) and not isinstance(self.samples, bool) and 1 <= self.samples <= 64):
            raise ValueError(f"likelihood.samples must be an integer in [1, 64]; got {self.samples!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, mean: float) -> LikelihoodLearning:
        """From the ``likelihood`` config (``prior_strength``, ``prior_mean`` (null: ``mean``), ``decimation``,
        ``update_every``, ``samples``)."""
        cfg = dict(cfg or {})
        prior_mean = cfg.get("prior_mean")
        strength = cfg.get("prior_strength", 1e-3)
        prior = PrecisionPrior(float(mean if prior_mean is None else prior_mean),
                               math.inf if str(strength).lower() in ("inf", "infinity") else float(strength))
        dec = cfg.get("decimation", "auto")
        # the integers as given: __post_init__ refuses a float (nan, inf, 1e30) naming the key, int() would not
        return cls(prior, dec if dec == "auto" else float(dec), cfg.get("update_every", 25), cfg.get("samples", 1))

    def alpha(self, residual: Tensor, mask: Tensor | None) -> Tensor:
        """``alpha`` per pair ``[B]``: the given number, or estimated from ``residual`` ``[B, 1, D, H, W]``."""
        if self.decimation == "auto":
            return decimation_factor(residual, mask)
        return torch.full((residual.shape[0],), float(self.decimation), device=residual.device)


def parse_data_weight(value: Any) -> float | str | None:
    """``data_weight`` as given by a caller: None, ``"auto"`` or a number > 0 (one-line error naming the key)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"data_weight must be 'auto' or a finite number > 0; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"data_weight must be 'auto' or a finite number > 0; got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ Student-t
def student_t_weights(r2: Tensor, precision: float | Tensor, nu: float) -> Tensor:
    """``E[tau_x] = (nu + 1) / (nu + w r_x^2)``: each voxel's weight under Student-t noise (1 as ``nu -> inf``)."""
    if math.isinf(nu):
        return torch.ones_like(r2)
    return (nu + 1.0) / (nu + precision * r2)


class ResidualHistogram:
    """Counts of squared residuals on fixed log-spaced bins, pooled over pairs: enough for 1-D/2-D maximum
    likelihood of the noise model without keeping every voxel.

    Bins: ``log10 r^2`` from ``lo`` to ``hi`` in ``bins`` steps (values below ``lo`` fall in the first bin, above
    ``hi`` in the last); each bin stands for its geometric centre. Counts are mask-weighted.
    """

    def __init__(self, lo: float = -9.0, hi: float = 1.5, bins: int = 210) -> None:
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = torch.zeros(self.bins, dtype=torch.float64)

    @property
    def centres(self) -> Tensor:
        """``r^2`` at the bins' centres ``[bins]`` (float64)."""
        step = (self.hi - self.lo) / self.bins
        return 10.0 ** (self.lo + step * (torch.arange(self.bins, dtype=torch.float64) + 0.5))

    def add(self, r2: Tensor, mask: Tensor | None = None) -> ResidualHistogram:
        """Add a squared-residual map (``[..., D, H, W]``; ``mask`` weights broadcast to it)."""
        x = torch.log10(r2.detach().double().clamp_min(1e-30)).flatten()
        w = torch.ones_like(x) if mask is None else mask.detach().double().expand_as(r2).flatten()
        idx = ((x - self.lo) / (self.hi - self.lo) * self.bins).floor().clamp(0, self.bins - 1).long()
        self.counts.index_add_(0, idx.cpu(), w.cpu())
        return self

    def state(self) -> list[float]:
        return self.counts.tolist()

    @classmethod
    def from_state(cls, counts: list[float], **kw: float) -> ResidualHistogram:
        h = cls(**kw)
        h.counts = torch.tensor(counts, dtype=torch.float64)
        return h


def _student_t_loglik(nu: float, w: float, r2: Tensor, counts: Tensor) -> float:
    """Mean log-density of Student-t noise (precision ``w``, ``nu`` dof) over weighted squared residuals."""
    lg = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) + 0.5 * math.log(w / (nu * math.pi))
    ll = lg - (nu + 1) / 2 * torch.log1p(w * r2 / nu)
    return float((ll * counts).sum() / counts.sum())


def fit_student_t(hist: ResidualHistogram, nu_init: float = 10.0, iters: int = 50,
                  nu_range: tuple[float, float] = (0.2, 1e4)) -> tuple[float, float]:
    """Maximum-likelihood ``(w, nu)`` of Student-t noise for the pooled squared residuals in ``hist``.

    Alternates the EM update of the precision, ``w = N / sum_x tau_x r_x^2`` with ``tau_x = (nu + 1) / (nu + w
    r_x^2)``, and a 1-D golden-section search of the log-likelihood in ``log nu`` over ``nu_range``.

    Returns:
        ``(w, nu)``; ``nu`` at the upper end of the range means the residuals look Gaussian.
    """
    r2, c = hist.centres, hist.counts
    n = float(c.sum())
    if n <= 0:
        raise ValueError("fit_student_t: no residuals in the histogram")
    w = n / float((c * r2).sum())
    nu = float(min(max(nu_init, nu_range[0]), nu_range[1]))
    lo, hi = math.log(nu_range[0]), math.log(nu_range[1])
    for _ in range(iters):
        tau = (nu + 1) / (nu + w * r2)
        w = n / float((c * tau * r2).sum())
        nu_new = math.exp(_golden(lambda t, w=w: -_student_t_loglik(math.exp(t), w, r2, c), lo, hi))
        if abs(math.log(nu_new / nu)) < 1e-4:
            nu = nu_new
            break
        nu = nu_new
    return w, nu


def _golden(f: Any, a: float, b: float, tol: float = 1e-5) -> float:
    """Minimiser of a unimodal ``f`` on ``[a, b]`` by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2
