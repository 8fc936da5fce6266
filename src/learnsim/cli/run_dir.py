"""One run folder per run: two ``learnsim-train`` / ``learnsim-test`` runs started in the same second never share one.

The run folder is ``runs/<task>/<name>/<%Y-%m-%d_%H-%M-%S>`` (``hydra.run.dir``): a SLURM array starts many runs in
the same second, and in one folder they would overwrite each other's checkpoints and prune each other's q_v
states. :class:`UniqueRunDir`, a Hydra callback the entry points add (:data:`OVERRIDE`), claims the folder before
Hydra writes anything into it: it creates it with an exclusive ``mkdir`` and, when it exists already, takes
``<time>_1``, ``<time>_2``, ... A ``hydra.run.dir`` without ``${now:...}`` (a folder named on purpose, or the one
Lightning passes to its DDP processes) is used as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["UniqueRunDir", "claim_run_dir", "OVERRIDE", "with_run_dir_callback"]

#: the command-line override that installs :class:`UniqueRunDir`
OVERRIDE = "+hydra.callbacks.learnsim_unique_run_dir._target_=learnsim.cli.run_dir.UniqueRunDir"


def claim_run_dir(base: Path, tries: int = 1000) -> Path:
    """Create ``base`` (or, if it exists, the first free ``base_1``, ``base_2``, ...) exclusively and return it."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(tries):
        candidate = base if i == 0 else base.with_name(f"{base.name}_{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{base}: this run folder and {tries - 1} numbered ones beside it exist already")


class UniqueRunDir(Callback):
    """Hydra callback: make a time-stamped ``hydra.run.dir`` this run's own (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        raw = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir")
        if "${now:" not in str(raw):
            return
        claimed = claim_run_dir(Path(str(config.hydra.run.dir)))
        with open_dict(config):
            config.hydra.run.dir = str(claimed)


def with_run_dir_callback(argv: list[str]) -> list[str]:
    """``argv`` with :data:`OVERRIDE` added, unless it is there or the user names a fixed ``hydra.run.dir`` (one
    without ``${now:...}``)."""
    for a in argv:
        a = a.lstrip("+~")
        if a.startswith("hydra.callbacks.learnsim_unique_run_dir") or (
            a.startswith("hydra.run.dir=") and "${now:" not in a
        ):
            return argv
    return [*argv, OVERRIDE]
