"""The paper's settings, in one table: what :meth:`VariationalRegistration.paper` builds and the configs repeat.

Grzech et al. (CVPR 2022) fit q_v with per-energy settings (the original code's ``SSD`` / ``LCC`` configs): the
regulariser weight ``w_reg``, Adam's learning rate and the number of Adam steps. Everything else is shared:
12 squarings, the Sobolev smoother (``s = 3``, ``lambda = 0.5``), q_v initialised with ``sigma = 0.5``,
``u = 0.1``, rank 1, and U(-0.1, 0.1) voxel noise on the sampling coordinates while training.
``learnsim/conf/experiment/ssd.yaml`` / ``lcc.yaml`` state the same numbers (a test checks they agree).

:data:`REGISTER` holds what :func:`learnsim.register` runs when the caller says nothing: a coarse-to-fine
schedule and a likelihood precision chosen by measurement on the demo test pairs (docs/usage.md, "Defaults of
learnsim-register"; docs/method.md, "Schedules" and "Energy scales").
"""

from __future__ import annotations

from dataclasses import dataclass

from learnsim.energies import EnergyKind

__all__ = ["PaperSettings", "PAPER", "RegisterSettings", "REGISTER", "REGISTER_HISTMATCH", "REGISTER_METRIC",
           "REGISTER_NO_STEPS", "REGISTER_INT_DOWNSIZE"]


@dataclass(frozen=True)
class PaperSettings:
    """One energy's q_v settings in the paper (voxel units; ``lr`` is Adam's on q_v's parameters)."""

    w_reg: float
    lr: float
    no_iters: int
    no_steps: int = 12
    sigma_init: float = 0.5
    u_init: float = 0.1
    rank: int = 1
    sobolev_s: int = 3
    sobolev_lambda: float = 0.5
    uniform_noise: float = 0.1


PAPER: dict[EnergyKind, PaperSettings] = {
    EnergyKind.SSD: PaperSettings(w_reg=1.8, lr=0.01, no_iters=1024),
    EnergyKind.LCC: PaperSettings(w_reg=2.8, lr=0.02, no_iters=1344),
}


@dataclass(frozen=True)
class RegisterSettings:
    """What :func:`learnsim.register` uses by default for one energy (levels coarsest first).

    ``data_weight`` (the likelihood precision) applies to the ``"ssd"`` / ``"lcc"`` baselines only: a learnt
    metric keeps its own.
    """

    levels: int
    level_iters: tuple[int, ...]
    level_lr: tuple[float, ...]
    data_weight: float


#: LCC (the default metric): 100 / 50 / 15 steps, the finest at lr 0.1, chosen on 4 demo validation pairs at 128^3
#: (docs/speed.md, "learnsim-register in 30 seconds"): the same DSC as the earlier 200 / 100 / 50 at lr 0.05
#: (``level_iters=200,100,50 level_lr=0.05,0.05,0.05`` gives it back) in half the time. SSD keeps 200 / 100 / 50.
REGISTER: dict[EnergyKind, RegisterSettings] = {
    EnergyKind.SSD: RegisterSettings(3, (200, 100, 50), (0.05, 0.05, 0.05), data_weight=100.0),
    EnergyKind.LCC: RegisterSettings(3, (100, 50, 15), (0.05, 0.05, 0.1), data_weight=10.0),
}

#: the metric :func:`learnsim.register` / ``learnsim-register`` use when the caller names none: LCC registered the
#: demo test pairs at 128^3 best of the baselines (docs/usage.md, "Defaults of learnsim-register")
REGISTER_METRIC = "lcc"

#: integration :func:`learnsim.register` uses by default: the image grid with the fewest squarings keeping the first
#: step under half a voxel (measured equal to 12 squarings); ``int_downsize=2`` (fast mode) halves the time but cost
#: ~1 DSC point at 128^3 and halves the uncertainty maps (docs/usage.md, "Defaults of learnsim-register")
REGISTER_NO_STEPS: int | str = "auto"
REGISTER_INT_DOWNSIZE = 1

#: :func:`learnsim.register` matches the moving image's histogram to the fixed image's unless told otherwise
REGISTER_HISTMATCH = True
