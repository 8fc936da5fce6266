"""The allowed range of every numeric setting, in one table shared by :func:`learnsim.register`,
``learnsim-register``, ``learnsim-test`` and ``learnsim-train``.

Each setting is a *concept* (``"lr"``, ``"w_reg"``, ...) with one :class:`Range`; each entry point names it its own
way (``lr`` in ``learnsim-register``, ``q_v.lr`` in the Hydra configs): :data:`REGISTER_KEYS` and
:data:`CONFIG_KEYS` map those names to the concepts. A value out of range, non-finite (NaN, inf), of the wrong
type (a boolean for a number, a float for an integer) or absurdly large (a huge integer, 1e30) is refused with one
line naming the key as the user wrote it and its allowed range. The upper bounds are far beyond any sensible value;
they keep a mistyped number from running out of memory or forever (``rank=100000``, ``no_steps=100000``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["Range", "RANGES", "REGISTER_KEYS", "CONFIG_KEYS", "check_value", "check_register_settings",
           "check_config", "warn_ignored_lr", "SPLITS"]

#: the pair lists ``learnsim-test`` may evaluate (``split=``)
SPLITS = ("test", "val")


@dataclass(frozen=True)
class Range:
    """An allowed range: ``kind`` ``"int"`` or ``"float"``; ``low`` / ``high`` inclusive unless ``low_open``;
    ``special``: a string also accepted (``"auto"``); ``nullable``: None accepted (the default applies);
    ``listed``: a list of such numbers (one per pyramid level, or per grid axis) or a single one; ``infinite``:
    ``+inf`` accepted too (a limit, e.g. Student-t's ``nu = inf`` is SSD)."""

    kind: str
    low: float
    high: float
    low_open: bool = False
    special: str | None = None
    nullable: bool = False
    listed: bool = False
    infinite: bool = False

    def describe(self) -> str:
        """``"a number in (0, 10000]"``, ``"an integer in [1, 1000000]"``, ``... or 'auto'``."""
        what = "an integer" if self.kind == "int" else "a finite number"
        low = "(" if self.low_open else "["
        fmt = (lambda x: str(int(x))) if self.kind == "int" else (lambda x: f"{x:g}")
        text = f"{what} in {low}{fmt(self.low)}, {fmt(self.high)}]"
        if self.listed:
            text = f"{text} (or a list of them)"
        if self.infinite:
            text += " or inf"
        if self.special:
            text += f" or '{self.special}'"
        if self.nullable:
            text += " or null"
        return text

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is in the range (a list element by element when ``listed``)."""
        if value is None:
            return self.nullable
        if self.special is not None and isinstance(value, str) and value.strip().lower() == self.special:
            return True
        if self.listed and isinstance(value, (list, tuple, ListConfig)):
            return len(value) > 0 and all(self._number_ok(v) for v in value)
        return self._number_ok(value)

    def _number_ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.infinite and value == math.inf:
            return True
        if not math.isfinite(value) or value > self.high:
            return False
        return value > self.low if self.low_open else value >= self.low


_BIG = 1e6
#: one range per concept
RANGES: dict[str, Range] = {
    "no_iters": Range("int", 1, 1_000_000, nullable=True),
    "level_iters": Range("int", 0, 1_000_000, nullable=True, listed=True),
    "levels": Range("int", 1, 6, nullable=True),
    "lr": Range("float", 0, 1e4, low_open=True, nullable=True, listed=True),
    "w_reg": Range("float", 0, _BIG, nullable=True),
    "data_weight": Range("float", 0, _BIG, low_open=True, nullable=True, special="auto"),
    "sigma_init": Range("float", 0, 1e3, low_open=True),
    "u_init": Range("float", -1e3, 1e3),
    "rank": Range("int", 1, 64),
    "no_steps": Range("int", 0, 24, special="auto"),
    "int_downsize": Range("int", 1, 8),
    "cps": Range("int", 1, 64),
    "sobolev_s": Range("int", 0, 64),
    "sobolev_lambda": Range("float", 0, _BIG),
    "no_samples": Range("int", 0, 10_000),
    "no_samples_test": Range("int", 1, 10_000),
    "no_samples_uncertainty": Range("int", 0, 10_000),
    "dims": Range("int", 4, 512, nullable=True, listed=True),
    "seed": Range("int", 0, 2**63 - 1),
    "max_pairs": Range("int", 1, 10**9, nullable=True),
    "instance_iters": Range("int", 0, 1_000_000),
    "lcc_radius": Range("int", 1, 16),
    "batch_size": Range("int", 1, 4096),
    "uniform_noise": Range("float", 0, 100),
    "log_period": Range("int", 1, 10**9),
    "no_iters_warm": Range("int", 1, 1_000_000, nullable=True),
    "optimizer_lr": Range("float", 0, 1e4, low_open=True, nullable=True),
    "max_epochs": Range("int", 0, 10**6, nullable=True),
    "nu": Range("float", 0, 1e30, low_open=True, infinite=True),  # Student-t degrees of freedom (inf: SSD)
    "noise_precision": Range("float", 0, _BIG, low_open=True, nullable=True),  # Student-t's w (null: the weight)  # -1 (Lightning: no limit) would run until max_time
}

#: ``learnsim-register`` / :func:`learnsim.register` keyword -> concept
REGISTER_KEYS: dict[str, str] = {
    "no_iters": "no_iters", "level_iters": "level_iters", "levels": "levels", "lr": "lr", "level_lr": "lr",
    "w_reg": "w_reg", "data_weight": "data_weight", "sigma_init": "sigma_init", "u_init": "u_init", "rank": "rank",
    "no_steps": "no_steps", "int_downsize": "int_downsize", "cps": "cps", "sobolev_s": "sobolev_s",
    "sobolev_lambda": "sobolev_lambda", "no_samples": "no_samples", "dims": "dims", "seed": "seed",
}

#: ``learnsim-test`` / ``learnsim-train`` config key -> concept (keys absent from a config are skipped)
CONFIG_KEYS: dict[str, str] = {
    "q_v.no_iters": "no_iters", "q_v.level_iters": "level_iters", "q_v.levels": "levels", "q_v.lr": "lr",
    "q_v.level_lr": "lr", "q_v.sigma_init": "sigma_init", "q_v.u_init": "u_init", "q_v.rank": "rank",
    "q_v.no_iters_warm": "no_iters_warm", "reg_loss.w_reg": "w_reg", "metric.energy.weight": "data_weight",
    "metric.energy.radius": "lcc_radius", "transformation.no_steps": "no_steps",
    "transformation.int_downsize": "int_downsize", "transformation.cps": "cps", "sobolev.s": "sobolev_s",
    "sobolev.lam": "sobolev_lambda", "no_samples": "no_samples_test",
    "no_samples_uncertainty": "no_samples_uncertainty", "max_pairs": "max_pairs", "seed": "seed",
    "instance_optimisation_iters": "instance_iters", "instance_lr": "optimizer_lr", "data.dims": "dims",
    "data.batch_size": "batch_size", "uniform_noise": "uniform_noise", "log_period": "log_period",
    "no_iters_val": "no_iters", "q_f.sigma_init": "sigma_init", "q_f.u_init": "u_init", "q_f.rank": "rank",
    "optimizer.q_f.lr": "optimizer_lr", "optimizer.q_phi.lr": "optimizer_lr", "trainer.max_epochs": "max_epochs",
    "metric.energy.nu": "nu", "metric.energy.precision": "noise_precision",
}


def check_value(key: str, value: Any, concept: str | None = None) -> None:
    """Refuse ``value`` for the setting ``key`` (concept ``concept``, default ``key``) if out of its range.

    Raises:
        ValueError: ``"<key> must be <range>; got <value>"``.
    """
    rng = RANGES[concept or key]
    if not rng.accepts(value):
        shown = list(value) if isinstance(value, ListConfig) else value
        raise ValueError(f"{key} must be {rng.describe()}; got {shown!r}")


def check_register_settings(settings: Mapping[str, Any]) -> None:
    """Check every numeric keyword of :func:`learnsim.register` present in ``settings`` (others are ignored)."""
    for key, value in settings.items():
        if key in REGISTER_KEYS:
            check_value(key, value, REGISTER_KEYS[key])


_ABSENT = object()
_PER_LEVEL = ("q_v.level_iters", "q_v.level_lr")  # lists in a config (learnsim-register also takes one number)


def check_config(cfg: DictConfig) -> None:
    """Check every numeric key of :data:`CONFIG_KEYS` that a composed ``learnsim-test`` / ``learnsim-train`` config
    holds (an interpolation is resolved first; a key the config lacks is skipped)."""
    for key, concept in CONFIG_KEYS.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
        except Exception:  # an interpolation that does not resolve is reported by whatever reads it
            continue
        if value is _ABSENT:
            continue
        if key == "data.dims" and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if key in _PER_LEVEL and value is not None and not isinstance(value, (list, tuple, ListConfig)):
            raise ValueError(f"{key} must be null or a list of {RANGES[concept].describe()}, one per level, "
                             f"coarsest first; got {value!r}")
        check_value(key, value, concept)


def _hydra_overrides() -> list[str]:
    """The command line's ``key=value`` overrides of the running Hydra job (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # no Hydra job (an API call, a test composing its config)
        return []


def warn_ignored_lr(cfg: DictConfig, prog: str, overrides: list[str] | None = None) -> str | None:
    """Warn (stderr; the line is returned) when ``q_v.lr`` is given on the command line while ``q_v.level_lr`` sets
    every level's rate (``q_v=c2f``, every demo experiment): ``q_v.lr`` would be silently ignored.

    Args:
        overrides: the command line's overrides (default: the running Hydra job's).
    """
    level_lr = OmegaConf.select(cfg, "q_v.level_lr", default=None)
    if level_lr is None:
        return None
    given = [o for o in (overrides if overrides is not None else _hydra_overrides())
             if o.split("=", 1)[0].lstrip("+~") == "q_v.lr"]
    if not given:
        return None
    rate = OmegaConf.select(cfg, "q_v.lr", default=None)
    n = len(level_lr)
    msg = (f"{prog}: warning: q_v.lr={rate} is ignored: q_v.level_lr={list(level_lr)} sets every level's rate; "
           f"give q_v.level_lr=[{','.join([str(rate)] * n)}] instead")
    print(msg, file=sys.stderr)
    return msg
