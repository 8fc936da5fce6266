"""Where the time of a registration goes: wall-clock stage timers per pyramid level (``learnsim-register --profile``).

The q_v loop and :func:`learnsim.register` mark their stages with :func:`stage` (``sampling``, ``smoothing``,
``integration``, ``warp``, ``energy``, ``regulariser``, ``backward``, ``optimiser``, ...). Outside
:func:`profiling` every mark is one shared no-op context manager (no clock read, no allocation), so the
instrumented code costs nothing measurable when nobody profiles.

Inside ``with profiling() as prof:`` each mark adds its wall time (seconds, :func:`time.perf_counter`) to
``prof`` under the current *section*: a pyramid level (``"level 2/3 64x64x64"``, set by
:meth:`~learnsim.registration.VariationalRegistration.fit_levels`) or ``"outside the fit"``. Stages nest: a mark
inside another is counted in both (``integration`` holds ``squarings`` where a caller marks them); the table's
``other`` column of a level is its wall time minus the top-level stages. Forward stages time their own ops only:
autograd's backward pass of every stage is the single ``backward`` stage (splitting it would need hooks whose
cost is of the order of the smallest stages). On CUDA, pass ``synchronize=True`` so that each mark waits for the
device (this slows the fit; the table then shows where the device time goes).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StageProfile", "profiling", "stage", "section", "count_iterations", "active_profile"]

OUTSIDE = "outside the fit"
_NULL = contextlib.nullcontext()
_active: StageProfile | None = None


@dataclass
class _Section:
    """One section's totals: ``stages[name] = [seconds, calls]``, its iterations and its wall time."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    top: set[str] = field(default_factory=set)  # stages not nested in another (their sum <= the wall time)


class StageProfile:
    """Accumulated stage times, per section (pyramid level or outside the fit).

    Args:
        synchronize: wait for the CUDA device at every mark (CPU: no effect).
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = bool(synchronize) and torch.cuda.is_available()
        self.sections: dict[str, _Section] = {}
        self.current = OUTSIDE
        self._depth = 0

    def _section(self, name: str) -> _Section:
        return self.sections.setdefault(name, _Section())

    def _sync(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to stage ``name`` of the current section."""
        sec = self._section(self.current)
        if self._depth == 0:
            sec.top.add(name)
        self._depth += 1
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            rec = sec.stages.setdefault(name, [0.0, 0])
            rec[0] += time.perf_counter() - start
            rec[1] += 1
            self._depth -= 1

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Count everything inside under section ``name`` (a pyramid level), with its wall time."""
        previous, self.current = self.current, name
        sec = self._section(name)
        depth, self._depth = self._depth, 0
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            sec.seconds += time.perf_counter() - start
            self.current, self._depth = previous, depth

    def add(self, name: str, seconds: float, section: str = OUTSIDE) -> None:
        """Add ``seconds`` measured elsewhere (e.g. in another thread) to stage ``name`` of ``section``."""
        sec = self._section(section)
        rec = sec.stages.setdefault(name, [0.0, 0])
        rec[0] += float(seconds)
        rec[1] += 1
        sec.top.add(name)

    def as_dict(self) -> dict[str, Any]:
        """``{section: {"iterations", "seconds", "stages": {name: {"seconds", "calls", "ms_per_iteration"}}}}``."""
        out: dict[str, Any] = {}
        for name, sec in self.sections.items():
            per = max(sec.iterations, 1)
            out[name] = {
                "iterations": sec.iterations, "seconds": round(sec.seconds, 4),
                "stages": {k: {"seconds": round(s, 4), "calls": int(c), "ms_per_iteration": round(1000 * s / per, 3)}
                           for k, (s, c) in sec.stages.items()},
            }
        return out

    def table(self) -> str:
        """The profile as text: one row per pyramid level (ms per iteration of each stage), then the stages
        outside the fit (seconds)."""
        lines = []
        levels = [(n, s) for n, s in self.sections.items() if n != OUTSIDE]
        names = _ordered({k for _, s in levels for k in s.stages})
        if levels:
            head = ["level", "iters", "s", "ms/iter"] + names + ["other"]
            lines.append(" | ".join(head))
            for name, sec in levels:
                per = max(sec.iterations, 1)
                top = sum(sec.stages[k][0] for k in sec.top if k in sec.stages)
                row = [name, str(sec.iterations), f"{sec.seconds:.2f}", f"{1000 * sec.seconds / per:.1f}"]
                row += [f"{1000 * sec.stages[k][0] / per:.1f}" if k in sec.stages else "-" for k in names]
                row.append(f"{1000 * max(sec.seconds - top, 0.0) / per:.1f}")
                lines.append(" | ".join(row))
        outside = self.sections.get(OUTSIDE)
        if outside is not None and outside.stages:
            lines.append("outside the fit (s): " + ", ".join(
                f"{k} {s:.2f}" for k, (s, _) in outside.stages.items() if k in outside.top))
        return "\n".join(lines)


#: the order of the q_v loop's stages in the table (others follow alphabetically)
_ORDER = ("sampling", "smoothing", "integration", "warp", "energy", "regulariser", "entropy", "backward", "optimiser",
          "likelihood", "convergence", "pyramid")


def _ordered(names: set[str]) -> list[str]:
    return [k for k in _ORDER if k in names] + sorted(names - set(_ORDER))


@contextlib.contextmanager
def profiling(synchronize: bool = False) -> Iterator[StageProfile]:
    """Collect stage times of everything run inside (one profile at a time; nested calls reuse the outer one)."""
    global _active
    if _active is not None:
        yield _active
        return
    prof = StageProfile(synchronize)
    _active = prof
    try:
        yield prof
    finally:
        _active = None


def active_profile() -> StageProfile | None:
    """The profile being collected, or None."""
    return _active


def stage(name: str) -> contextlib.AbstractContextManager[None]:
    """Time the ``with`` body as stage ``name`` while :func:`profiling` is on; a shared no-op otherwise."""
    return _NULL if _active is None else _active.stage(name)


def section(name: str) -> contextlib.AbstractContextManager[None]:
    """Count the ``with`` body under section ``name`` (a pyramid level) while profiling; a no-op otherwise."""
    return _NULL if _active is None else _active.section(name)


def count_iterations(n: int = 1) -> None:
    """Add ``n`` q_v iterations to the current section (its ms per iteration divides by them)."""
    if _active is not None:
        _active._section(_active.current).iterations += int(n)
