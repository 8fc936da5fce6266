"""Where the Hydra configs live and how the entry points find them.

``conf/`` sits at the repository root (an editable install finds it there); ``LEARNSIM_CONF`` points elsewhere,
and Hydra's own ``--config-dir`` adds a folder of the user's configs on top.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    env = os.environ.get("LEARNSIM_CONF")
    if env:
        return str(Path(env).resolve())
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf" / "train.yaml").is_file():
            return str(parent / "conf")
    raise FileNotFoundError("learnsim: cannot find the Hydra configs (conf/train.yaml); set LEARNSIM_CONF=/path/to/conf")


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
    OmegaConf errors) exit with status 1 and ``"<prog>: <message>"``; Ctrl-C exits with status 130. In both cases
    the run folder is removed if it holds only Hydra's start-up files (never anything else). Set
    ``LEARNSIM_DEBUG=1`` to get the full traceback instead.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    debug = bool(os.environ.get("LEARNSIM_DEBUG"))
    try:
        return fn(cfg)
    except KeyboardInterrupt:
        if debug:
            raise
        removed = remove_empty_run_dir(run_dir)
        print(f"{prog}: interrupted" + (f"; removed the empty run folder {run_dir}" if removed else ""), file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as exc:
        if exc.code not in (0, None):
            remove_empty_run_dir(run_dir)
        raise
    except _user_errors() as exc:
        if debug:
            raise
        remove_empty_run_dir(run_dir)
        msg = str(exc)
        raise SystemExit(msg if msg.startswith(f"{prog}:") else f"{prog}: {msg}") from None
