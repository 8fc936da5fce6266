"""Ending a command cleanly: SIGTERM handled like Ctrl-C, and one line for a full or read-only disk.

Python's default SIGTERM action ends the process at once, so no ``finally`` runs: a staging folder
(``.OUT.partial-*``) or a temporary file would stay behind. Inside :func:`sigterm_as_interrupt` SIGTERM raises
:class:`Terminated` (a ``KeyboardInterrupt``) instead, so the clean-up that Ctrl-C gets runs too; the command then
ends with status 143 (128 + SIGTERM), Ctrl-C with 130.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["Terminated", "sigterm_as_interrupt", "interrupt_status", "disk_error", "input_error", "run_command"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM inside :func:`sigterm_as_interrupt`."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_status(exc: BaseException) -> int:
    """The exit status of an interrupted command: 143 for SIGTERM (:class:`Terminated`), 130 for Ctrl-C."""
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


#: errors of the disk, not of the program: reported in one line, never as a traceback
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def disk_error(exc: BaseException) -> str | None:
    """One line for a full, over-quota or read-only disk (naming the file where known); None for other errors."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRNOS:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where} (free some space or choose another output folder)"


def input_error(exc: BaseException) -> str | None:
    """One line for an error the user can act on: a bad input (``ValueError``), a missing, unreadable or misplaced
    file, or a full disk; None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, ValueError) or isinstance(
        exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
    ):
        return str(exc)
    return disk_error(exc)


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's ``body`` and return its exit status: the body's (0 for None); 130 / 143 on Ctrl-C / SIGTERM
    (SIGTERM handled as Ctrl-C, so the same clean-up runs); 1 with one line ``prog: ...`` on stderr for an
    :func:`input_error` (``LEARNSIM_DEBUG=1``: the traceback instead); anything else propagates (a bug keeps its
    traceback). Every learnsim file is written atomically, so an interrupted command leaves nothing half-written."""
    try:
        with sigterm_as_interrupt():
            return body() or 0
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted", file=sys.stderr)
        return interrupt_status(exc)
    except (ValueError, OSError) as exc:  # bad inputs (missing files, a folder refused), a full disk
        line = input_error(exc)
        if line is None or os.environ.get("LEARNSIM_DEBUG"):
            raise
        print(f"{prog}: {line}", file=sys.stderr)
        return 1
