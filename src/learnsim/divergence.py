"""Divergence of a q_v fit: a loss or a field that became NaN or inf (too large a learning rate or data weight).

:meth:`learnsim.registration.VariationalRegistration.fit` checks its loss every :data:`CHECK_EVERY` iterations and
its loss and q_v at the end, and raises :class:`FitDiverged`: ``learnsim-register`` ends with that one line and
writes nothing, ``learnsim-test`` marks the pair failed (not averaged in; listed in ``summary.json``), and
``learnsim-train`` stops with it. Checking every few iterations keeps the host-device syncs rare on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["FitDiverged", "CHECK_EVERY", "check_loss", "check_fit"]

#: q_v iterations between two finiteness checks of the loss
CHECK_EVERY = 16

_ADVICE = ("lower the learning rate (learnsim-register: lr / level_lr; learnsim-test, learnsim-train: q_v.lr / "
           "q_v.level_lr) or the data weight (data_weight / metric.energy.weight)")


class FitDiverged(ValueError):
    """A q_v fit whose loss or q_v parameters are no longer finite; the message says which keys to lower."""

    def __init__(self, what: str, iteration: int) -> None:
        self.what = what
        self.iteration = int(iteration)
        super().__init__(f"the q_v fit diverged ({what} is NaN or inf at iteration {self.iteration}): {_ADVICE}")


def check_loss(loss: Tensor, iteration: int) -> None:
    """Raise :class:`FitDiverged` if any pair's loss is not finite (one host sync)."""
    if not bool(torch.isfinite(loss).all()):
        raise FitDiverged("the loss", iteration)


def check_fit(loss: Tensor, params: Iterable[Tensor], iteration: int) -> None:
    """Raise :class:`FitDiverged` if the final loss or any q_v parameter (mean, variance, factors) is not finite."""
    check_loss(loss, iteration)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise FitDiverged("the q_v field", iteration)
