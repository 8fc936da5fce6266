"""Where the Hydra configs live and how the entry points find them.

The configs are package data (``learnsim/conf/``, found with :mod:`importlib.resources`), so an editable install,
a wheel and an sdist all carry them and every command runs from any working folder. ``LEARNSIM_CONF`` points at
another config folder instead, and Hydra's own ``--config-dir`` / ``hydra.searchpath`` add a folder of the user's
configs on top.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnsim.interrupt import disk_error, interrupt_status


def config_dir() -> str:
    """The Hydra config folder: ``LEARNSIM_CONF`` if set, else the package's own ``learnsim/conf``.

    Raises:
        FileNotFoundError: naming the folder searched when it holds no ``train.yaml``.
    """
    from importlib import resources

    env = os.environ.get("LEARNSIM_CONF")
    folder = Path(env).resolve() if env else Path(str(resources.files("learnsim").joinpath("conf")))
    if not (folder / "train.yaml").is_file():
        where = "LEARNSIM_CONF" if env else "the installed package"
        raise FileNotFoundError(f"learnsim: no Hydra configs (train.yaml) in {folder} ({where}); reinstall learnsim "
                                "or set LEARNSIM_CONF=/path/to/conf")
    return str(folder)


def to_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain Python (for checkpoints and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- error handling
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def _only_hydra_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes on start (``.hydra/`` and the job's ``.log``)."""
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            if any(p.name not in _HYDRA_FILES or not p.is_file() for p in entry.iterdir()):
                return False
        elif not (entry.is_file() and entry.suffix == ".log"):
            return False
    return True


def remove_empty_run_dir(run_dir: str | os.PathLike | None) -> bool:
    """Delete a run folder of a failed attempt if it holds only Hydra's own start-up files; returns whether it did.

    Anything else in it (a checkpoint, a q_v state, a metrics file, a user's file) keeps the folder as it is.
    """
    if run_dir is None:
        return False
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not _only_hydra_files(run_dir):
        return False
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, HydraException, OmegaConfBaseException)


def run_guarded(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a Hydra task ``fn(cfg)``; a bad input or Ctrl-C ends the program with one message, not a traceback.

    Bad inputs (``ValueError`` such as :class:`~learnsim.data.validate.DataValidationError`, missing files, Hydra and
    OmegaConf errors) and a full disk exit with status 1 and ``"<prog>: <message>"``; Ctrl-C exits with status 130,
    SIGTERM (:mod:`learnsim.interrupt`) with 143. On any failure the run folder is removed if it holds only Hydra's
    start-up files (never anything else). Set
    ``LEARNSIM_DEBUG=1`` to get the full traceback instead.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    debug = bool(os.environ.get("LEARNSIM_DEBUG"))
    try:
        return fn(cfg)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        removed = remove_empty_run_dir(run_dir)
        print(f"{prog}: interrupted" + (f"; removed the empty run folder {run_dir}" if removed else ""), file=sys.stderr)
        raise SystemExit(interrupt_status(exc)) from None
    except SystemExit as exc:
        if exc.code not in (0, None):
            remove_empty_run_dir(run_dir)
        raise
    except Exception as exc:
        remove_empty_run_dir(run_dir)  # any failure: a run folder holding only Hydra's files does not stay
        line = None if debug else _one_line(prog, exc)
        if line is None:
            raise
        raise SystemExit(line) from None


def _one_line(prog: str, exc: Exception) -> str | None:
    """The one-line message of a bad input or a full disk; None for anything else (a bug: its traceback)."""
    if isinstance(exc, _user_errors()):
        msg = str(exc)
        return msg if msg.startswith(f"{prog}:") else f"{prog}: {msg}"
    disk = disk_error(exc)
    return f"{prog}: {disk}" if disk else None
