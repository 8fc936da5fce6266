r"""A learnt metric's scale against its baseline: the energy ratio ``rho`` and the matched precision.

A learnt metric ``E_phi = w Q_phi`` changes two things at once: its *scale* (how large ``Q_phi`` is for a given
misalignment: a gain ``k`` on the features multiplies SSD's ``Q`` by ``k^2``), which acts on q_v exactly as a
larger likelihood precision would, and its *shape* (which residuals it counts). To tell them apart
(docs/method.md, "Scale and shape of a learnt metric"):

    rho = Q_phi(F, M o w) / Q_base(F, M o w)

on the same pair, transformation and mask, with ``Q = 0.5 sum_mask r^2`` the residual quadratic form of each
metric's noise model (:func:`learnsim.likelihood.residual_quadratic`: SSD's energy over its weight; LCC's
``sum_mask (1 - cc)``, so for LCC ``rho`` compares the unexplained local variance of features and of intensities).
The *matched* baseline is the baseline at precision ``w rho``: at the learnt metric's fits it has the learnt
metric's energy, so any difference left between the two is the shape's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learnsim.likelihood import residual_quadratic
from learnsim.spatial import warp

__all__ = ["baseline_of", "energy_ratio", "quadratic_ratio", "matched_precision"]


def baseline_of(metric: Any) -> Any:
    """The baseline (no encoder, weight 1) of ``metric``'s energy: SSD for CNN_SSD, LCC (same window) for CNN_LCC."""
    from learnsim.energies import EnergyKind
    from learnsim.metric import build_metric

    if metric.energy_kind is EnergyKind.LCC:
        return build_metric("lcc", radius=metric.energy.radius).to(_device(metric))
    return build_metric("ssd").to(_device(metric))


def _device(metric: Any) -> torch.device:
    buf = next(iter(list(metric.parameters()) + list(metric.buffers())), None)
    return buf.device if buf is not None else torch.device("cpu")


@torch.no_grad()
def energy_ratio(metric: Any, fixed: Tensor, moving: Tensor, disp: Tensor, mask: Tensor | None = None) -> Tensor:
    """``rho = Q_metric / Q_baseline`` per pair ``[B]`` at the transformation ``disp``.

    Args:
        metric: a :class:`~learnsim.metric.SimilarityMetric` (Gaussian energy: SSD or LCC on features).
        fixed: ``[1 or B, 1, D, H, W]``; moving: ``[B, 1, D, H, W]``; disp: ``[B, 3, D, H, W]`` voxels.
        mask: ``[1 or B, 1, D, H, W]`` or None.
    Returns:
        ``[B]``: 1 for a baseline (or a learnt metric at its Dirac initialisation).
    """
    warped = warp(moving, disp)
    base = baseline_of(metric)
    return quadratic_ratio(metric, metric(fixed, warped, mask), base(fixed, warped, mask) * metric.energy.weight,
                           mask, warped[0, 0].numel())


def quadratic_ratio(metric: Any, e_metric: Tensor, e_base: Tensor, mask: Tensor | None, numel: int) -> Tensor:
    """``rho`` per pair ``[B]`` from the two energies of the same pairs at the **same** weight (the metric's).

    Args:
        metric: the learnt metric (its energy kind and weight read the energies as ``Q``).
        e_metric, e_base: ``[B]`` the metric's energy and its baseline's, both at ``metric.energy.weight``.
        mask: the mask both were summed in, or None. numel: voxels per image (the count when ``mask`` is None).
    """
    q_metric = residual_quadratic(metric, e_metric, mask, numel)
    q_base = residual_quadratic(metric, e_base, mask, numel)
    return q_metric / q_base.clamp_min(1e-30)


def matched_precision(weight: float, rho: float) -> float:
    """The baseline's precision whose energy equals the learnt metric's: ``weight * rho``."""
    if not (rho > 0 and weight > 0):
        raise ValueError(f"matched precision needs weight > 0 and rho > 0; got weight {weight}, rho {rho}")
    return float(weight) * float(rho)
