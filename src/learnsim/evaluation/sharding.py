"""Registering a cohort over Lightning's ranks: the pairs sharded over processes (GPUs, nodes), one merged result.

``learnsim-test trainer=ddp trainer.devices=N [trainer.num_nodes=M]`` and ``learnsim-register --pairs ... --devices
N`` launch their ranks with Lightning Fabric (the processes, SLURM and torchrun environments as for training), and
every rank runs :func:`run_rank`:

1. the run folder's settings are checked (:class:`~learnsim.evaluation.cohort.CohortFolder`), ``fresh`` removes
   learnsim's outputs (rank 0), each rank checks its share of the pairs for complete outputs (hashes) and drops
   the record of an incomplete one;
2. the incomplete pairs, in list order, are dealt round-robin over the ranks (balanced also when resuming);
3. each rank registers its pairs (per-pair seed: :func:`~learnsim.evaluation.cohort.pair_seed`) and records each
   one atomically; rank 0 prints ``done/total`` and the time left across all ranks;
4. rank 0 merges the records into ``metrics.csv``, ``per_pair.csv``, ``summary.json`` and the figures: the files
   one process writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from learnsim.evaluation.cohort import CohortFolder, eta_text, shard
from learnsim.evaluation.evaluator import Evaluator

__all__ = ["Ranks", "CohortJob", "run_rank", "launch", "fabric_settings", "CohortProgress"]

T = TypeVar("T")


@dataclass
class Ranks:
    """This process' place among the ranks: ``rank`` of ``world`` (0 of 1 without a process group), its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to wait for (a process group of more than one process)."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.distributed:
            dist.barrier()

    def gather(self, items: list[int]) -> list[int]:
        """Every rank's ``items`` concatenated, sorted (the same list on every rank)."""
        if not self.distributed:
            return sorted(items)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, items)
        return sorted(i for part in parts for i in part)


class CohortProgress:
    """Rank 0's line across all ranks: ``pairs done / total (skipped), time left`` from the records on disk."""

    def __init__(self, folder: CohortFolder, todo: Sequence[str], total: int, world: int,
                 echo: Callable[[str], None] | None, every_s: float = 10.0) -> None:
        self.folder, self.todo, self.total, self.world, self.echo = folder, list(todo), total, world, echo
        self.start, self.every_s, self.last_t, self.last_n = time.perf_counter(), every_s, 0.0, -1

    def report(self, force: bool = False) -> None:
        """Print the line when the count changed (at most every ``every_s`` seconds unless ``force``)."""
        if self.echo is None or not self.todo:
            return
        done = sum(self.folder.done(p) for p in self.todo)
        now = time.perf_counter()
        if done == self.last_n or (not force and now - self.last_t < self.every_s and done < len(self.todo)):
            return
        self.last_n, self.last_t = done, now
        elapsed = now - self.start
        left = (len(self.todo) - done) * elapsed / done if done else float("nan")
        skipped = self.total - len(self.todo)
        self.echo(f"{self.folder.prog}: {done + skipped}/{self.total} pairs done"
                  + (f" ({skipped} skipped: already complete)" if skipped else "")
                  + f", {self.world} process{'es' if self.world > 1 else ''}, ~{eta_text(left)} left")


@dataclass
class CohortJob:
    """What every rank needs to register its share of a cohort.

    Attributes:
        out_dir: the run folder (shared by all ranks: a shared filesystem across nodes).
        dataset: the pairs, indexable; items as :class:`~learnsim.data.dataset.PairDataset`'s.
        pair_ids: ``pair_id`` of each item, in the list's order (the merged tables' order).
        settings: what the outputs depend on (:class:`~learnsim.evaluation.cohort.CohortFolder`).
        make_registration: builds the registration on a device (each rank its own).
        evaluator_kwargs: :class:`~learnsim.evaluation.evaluator.Evaluator`'s settings (not ``out_dir``).
        n_draw: posterior samples drawn per pair. seed: the run's seed (per-pair seeds derive from it).
        fresh: start over: remove learnsim's outputs of the run folder first.
    """

    out_dir: Path
    dataset: Dataset
    pair_ids: list[str]
    settings: Mapping[str, Any]
    make_registration: Callable[[torch.device], Any]
    evaluator_kwargs: dict[str, Any]
    n_draw: int
    seed: int = 0
    instance_optimisation_iters: int = 0
    fresh: bool = False
    prog: str = "learnsim-test"
    echo: Callable[[str], None] | None = print


def _prepare(job: CohortJob, folder: CohortFolder, ranks: Ranks) -> list[int]:
    """Settings check, ``fresh``, the completeness scan (each rank its share); the incomplete pairs' indices."""
    if not job.fresh:
        folder.check_settings()  # every rank reads the same file before anything changes it
    ranks.barrier()
    if ranks.rank == 0:
        if job.fresh:
            removed = folder.clear()
            if removed and job.echo is not None:
                job.echo(f"{job.prog}: fresh: removed {removed} learnsim output file(s) from {job.out_dir}")
        folder.write_manifest()
    ranks.barrier()
    incomplete = []
    for i in shard(len(job.pair_ids), ranks.rank, ranks.world):
        if not folder.complete(job.pair_ids[i]):
            folder.start_pair(job.pair_ids[i])  # a stale record would count as done in the progress line
            incomplete.append(i)
    return ranks.gather(incomplete)


def run_rank(job: CohortJob, ranks: Ranks) -> dict[str, Any] | None:
    """Register this rank's pairs of ``job``; on rank 0 merge the run; returns the summary (None on other ranks).

    Every rank must call it (it synchronises the ranks).
    """
    from learnsim.evaluation.run import PairRun

    folder = CohortFolder(job.out_dir, job.settings, job.prog)
    todo = _prepare(job, folder, ranks)
    total, echo0 = len(job.pair_ids), job.echo if ranks.rank == 0 else None
    if echo0 is not None and len(todo) < total:
        echo0(f"{job.prog}: {total - len(todo)} of {total} pairs already complete in {job.out_dir}: skipped "
              f"({folder.fresh_hint} starts over)")
    mine = todo[ranks.rank::ranks.world]
    progress = CohortProgress(folder, [job.pair_ids[i] for i in todo], total, ranks.world, echo0)
    if mine:
        run = PairRun(job.make_registration(ranks.device), Evaluator(job.out_dir, **job.evaluator_kwargs), folder,
                      ranks.device, job.n_draw, job.seed, job.instance_optimisation_iters, job.echo, job.prog)
        loader = DataLoader(Subset(job.dataset, mine), batch_size=1, num_workers=0)
        for k, batch in enumerate(loader):
            where = f"rank {ranks.rank}: {k + 1}/{len(mine)} " if ranks.world > 1 else ""
            run(batch, f"{where}q_v {batch['pair_id'][0]}")
            progress.report()
    _wait_for_all(ranks, progress)
    if ranks.rank != 0:
        return None
    return folder.merge(job.pair_ids, Evaluator(job.out_dir, **job.evaluator_kwargs), job.echo)


def _wait_for_all(ranks: Ranks, progress: CohortProgress, poll_s: float = 1.0) -> None:
    """Wait until every rank has registered its pairs; rank 0 keeps printing the progress line meanwhile."""
    if not ranks.distributed:
        progress.report(force=True)
        return
    work = dist.barrier(async_op=True)
    while ranks.rank == 0 and not work.is_completed():
        progress.report()
        time.sleep(poll_s)
    work.wait()
    progress.report(force=True)


def fabric_settings(trainer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Fabric's arguments from a ``trainer`` config (``accelerator``, ``devices``, ``num_nodes``, the strategy's
    ``process_group_backend`` and ``start_method``); None for one process (no trainer, or one device on one node).

    Raises:
        ValueError: naming ``trainer.devices`` / ``trainer.num_nodes`` when they are not positive integers.
    """
    if trainer is None:
        return None
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    nodes = 1 if nodes is None else nodes
    for key, value in (("trainer.devices", devices), ("trainer.num_nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1 for a cohort run; got {value!r}")
    if devices * nodes == 1:
        return None
    strategy = trainer.get("strategy") or {}
    strategy = strategy if isinstance(strategy, Mapping) else {}
    return {"accelerator": str(trainer.get("accelerator", "auto")), "devices": devices, "num_nodes": nodes,
            "process_group_backend": strategy.get("process_group_backend"),
            "start_method": strategy.get("start_method", "popen")}


def launch(fabric: Mapping[str, Any] | None, fn: Callable[[Ranks], T], device: torch.device) -> T:
    """Run ``fn`` on every rank: in this process (``fabric`` None: rank 0 of 1 on ``device``), or on the ranks
    Lightning Fabric starts (``fabric_settings``: new processes re-running the command, or those SLURM / torchrun
    started), each on its own device. Returns ``fn``'s result in this process."""
    if fabric is None:
        return fn(Ranks(0, 1, device))
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend=fabric["process_group_backend"], start_method=fabric["start_method"])
    runner = Fabric(accelerator=fabric["accelerator"], devices=fabric["devices"], num_nodes=fabric["num_nodes"],
                    strategy=strategy)
    return runner.launch(_on_rank, fn)


def _on_rank(fabric: Any, fn: Callable[[Ranks], T]) -> T:
    """``fn`` on one of Fabric's ranks (module level: picklable for ``start_method="spawn"``)."""
    return fn(Ranks(fabric.global_rank, fabric.world_size, fabric.device))
