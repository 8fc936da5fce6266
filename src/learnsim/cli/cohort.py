"""``learnsim-test`` as a cohort run: its composed config turned into a sharded, resumable job.

The run folder is Hydra's (``hydra.run.dir=DIR`` re-uses one: the same command there skips the complete pairs);
``fresh=true`` starts over in it; ``trainer=ddp trainer.devices=N [trainer.num_nodes=M]`` (or ``trainer=ddp_sim``
on CPU) shards the pairs over Lightning's ranks (:mod:`learnsim.evaluation.sharding`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from learnsim.cli.config import to_container
from learnsim.evaluation.sharding import CohortJob
from learnsim.io import sha256_file

__all__ = ["cohort_settings", "test_job", "is_rank_zero"]

#: config keys the outputs do not depend on: how the pairs are spread, where things go, what is logged
_NOT_SETTINGS = ("trainer", "fresh", "device", "logger", "paths", "max_pairs", "callbacks", "hydra")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only one)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cohort_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a ``learnsim-test`` run's outputs depend on: the resolved config without :data:`_NOT_SETTINGS` (the
    data folder kept), the checkpoint's SHA-256 (a retrained file under the same name is another run) and, for a
    matched baseline, the learnt run's precision and energy ratio (``matched_to`` evaluated again is another run)."""
    full = to_container(cfg)
    settings = {k: v for k, v in full.items() if k not in _NOT_SETTINGS}
    settings["data_dir"] = str((full.get("paths") or {}).get("data_dir"))
    if data := settings.get("data"):
        settings["data"] = {k: v for k, v in data.items() if k not in ("num_workers", "data_dir")}
    if cfg.get("ckpt") and Path(cfg.ckpt).is_file():
        settings["ckpt_sha256"] = sha256_file(cfg.ckpt)
    if cfg.get("matched_to") and (Path(cfg.matched_to) / "per_pair.csv").is_file():
        from learnsim.cli.test import matched_precision_of

        settings["matched_precision"] = list(matched_precision_of(cfg.matched_to))  # the learnt run's, as it is now
    return settings


def test_job(cfg: DictConfig, out_dir: Path, dataset: Any,
             make_registration: Callable[[torch.device], Any]) -> CohortJob:
    """The cohort job of a composed ``learnsim-test`` config: its pair list (the first ``max_pairs``), settings,
    evaluator settings and per-pair sampling."""
    ids = list(dataset.pair_ids)
    if cfg.get("max_pairs") is not None:
        ids = ids[: int(cfg.max_pairs)]
    fresh = cfg.get("fresh", False)
    if not isinstance(fresh, bool):
        raise ValueError(f"fresh must be true or false; got {fresh!r}")
    return CohortJob(
        out_dir=out_dir, dataset=dataset, pair_ids=ids, settings=cohort_settings(cfg),
        make_registration=make_registration,
        evaluator_kwargs={"save_nifti": cfg.save_nifti, "figures": cfg.figures, "seed": cfg.seed,
                          "metric_samples": cfg.no_samples, "run_name": str(cfg.name)},
        n_draw=max(int(cfg.no_samples), int(cfg.no_samples_uncertainty)), seed=int(cfg.seed),
        instance_optimisation_iters=int(cfg.get("instance_optimisation_iters", 0)), fresh=fresh,
    )
