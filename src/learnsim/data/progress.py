"""Progress of a cohort build: "k of N" and the time left, on a terminal as a bar, in a log as a line prefix."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``"<1 s"``, ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = max(float(seconds), 0.0)
    if s < 1:
        return "<1 s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, r = divmod(round(s), 60)
        return f"{m} min {r:02d} s"
    h, r = divmod(round(s) // 60, 60)
    return f"{h} h {r:02d} min"


class Progress:
    """Counts the subjects of a build and estimates the time left (mean time per subject so far x subjects left).

    Args:
        total: number of steps (subjects, the atlas included).
        desc: what is being built (bar label).
        log: where messages go (default ``print``).
        bar: draw a tqdm bar on stderr and print messages above it; default when ``log`` is ``print`` and stderr is
            a terminal. Without a bar every message from :meth:`step` starts with ``k/N (elapsed, ~left)``, so a
            log file or CI output shows the same.
        clock: the time source in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[..., None] = print,
        bar: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total = max(int(total), 0)
        self.done = 0
        self._log = log
        self._clock = clock
        self._t0 = clock()
        if bar is None:
            bar = log is print and sys.stderr.isatty()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="subject", file=sys.stderr, dynamic_ncols=True)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._t0

    def remaining(self) -> float | None:
        """Estimated seconds left (``None`` before the first step)."""
        if self.done == 0:
            return None
        return self.elapsed() / self.done * max(self.total - self.done, 0)

    def status(self) -> str:
        """``"k/N (elapsed, ~left)"``."""
        left = self.remaining()
        eta = "" if left is None else (", done" if self.done >= self.total else f", ~{format_duration(left)} left")
        return f"{self.done}/{self.total} ({format_duration(self.elapsed())}{eta})"

    def log(self, message: str) -> None:
        """A message that is not a step (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            self._log(message)

    def step(self, message: str | None = None) -> None:
        """One step done; ``message`` describes it (prefixed with the status when there is no bar)."""
        self.done += 1
        if self._bar is not None:
            if message:
                self._bar.write(message)
            self._bar.update(1)
        elif message:
            prefix = "[learnsim-data] "
            body = message.removeprefix(prefix)
            self._log(f"{prefix if message.startswith(prefix) else ''}{self.status()} {body}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
