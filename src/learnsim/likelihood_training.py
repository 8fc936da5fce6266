"""The likelihood learnt over the training pairs (``likelihood.learn``): state and updates for the training module.

After each training batch's q_v fit the module hands the pairs' residual statistics here (``E_q[Q]``, the mask's
voxel count, ``alpha``; for Student-t noise a histogram of squared residuals), keyed by pair; every update
recomputes the population posterior from the latest statistics of every pair seen (coordinate ascent alternating
with the q_v fits, as in Simpson et al. 2012) and sets the metric's precision (:mod:`learnsim.likelihood`):

* Gaussian: ``q(w) = Gamma(a0 + sum_k alpha_k n_k / 2, b0 + sum_k alpha_k Q_k)``; q_v's weight ``alpha_bar E[w]``
  with ``alpha_bar = sum alpha_k n_k / sum n_k``.
* Student-t: ``(w, nu)`` by maximum likelihood on the pooled histogram
  (:func:`~learnsim.likelihood.fit_student_t`); q_v's weight ``alpha_bar w``, the noise precision ``w``.

The statistics travel in checkpoints (:meth:`PopulationLikelihood.state_dict`), so a resumed run continues the
same posterior; the learnt precision itself is the metric's ``spec["weight"]`` (and ``nu``), which
:meth:`learnsim.metric.SimilarityMetric.from_checkpoint` reads back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from learnsim.likelihood import LikelihoodLearning, ResidualHistogram, fit_student_t

__all__ = ["PopulationLikelihood"]


class PopulationLikelihood:
    """One precision (and ``nu``) learnt over the training pairs.

    Args:
        learning: prior, decimation and samples (:class:`~learnsim.likelihood.LikelihoodLearning`).
        noise: ``"gaussian"`` or ``"student_t"`` (the metric's energy must then be Student-t).
    """

    def __init__(self, learning: LikelihoodLearning, noise: str = "gaussian") -> None:
        if noise not in ("gaussian", "student_t"):
            raise ValueError(f"likelihood.noise must be gaussian or student_t; got {noise!r}")
        self.learning = learning
        self.noise = noise
        self.pairs: dict[str, tuple[float, float, float]] = {}  # key -> (Q, n, alpha)
        self.hists: dict[str, list[float]] = {}  # key -> squared-residual histogram counts (Student-t)
        self.nu = math.inf

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, start: float) -> PopulationLikelihood | None:
        """From the ``likelihood`` config; None unless ``learn`` is true. ``start``: the metric's weight."""
        cfg = dict(cfg or {})
        if not cfg.get("learn", False):
            return None
        return cls(LikelihoodLearning.from_config(cfg, start), str(cfg.get("noise", "gaussian")))

    def add(self, keys: list[str], quad: list[float], count: list[float], alpha: list[float],
            r2_hists: list[ResidualHistogram] | None = None) -> None:
        """Record (replace) the latest statistics of these pairs."""
        for i, k in enumerate(keys):
            self.pairs[str(k)] = (float(quad[i]), float(count[i]), float(alpha[i]))
            if r2_hists is not None:
                self.hists[str(k)] = r2_hists[i].state()

    def update(self) -> dict[str, float]:
        """The population precision from every pair's latest statistics: ``{"data_weight", "precision",
        "decimation", "nu"}`` (``data_weight`` is what q_v sees)."""
        if not self.pairs:
            raise ValueError("PopulationLikelihood.update: no pair statistics yet")
        n = sum(c for _, c, _ in self.pairs.values())
        an = sum(a * c for _, c, a in self.pairs.values())
        alpha_bar = an / n
        if self.noise == "student_t":
            pooled = ResidualHistogram()
            for counts in self.hists.values():
                pooled.counts += ResidualHistogram.from_state(counts).counts
            w, self.nu = fit_student_t(pooled, nu_init=10.0 if math.isinf(self.nu) else self.nu)
            expected = w
        else:
            aq = sum(a * q for q, _, a in self.pairs.values())
            expected = float(self.learning.prior.expected(aq, an, 1.0))
        return {"data_weight": alpha_bar * expected, "precision": expected, "decimation": alpha_bar, "nu": self.nu}

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": {k: list(v) for k, v in self.pairs.items()}, "hists": dict(self.hists), "nu": self.nu}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pairs = {k: tuple(v) for k, v in dict(state.get("pairs", {})).items()}  # type: ignore[misc]
        self.hists = {k: list(v) for k, v in dict(state.get("hists", {})).items()}
        self.nu = float(state.get("nu", math.inf))
