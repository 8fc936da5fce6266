"""``learnsim-test ckpt=PATH [+experiment=...] [overrides]`` or ``learnsim-test metric=ssd|lcc``: evaluation.

Builds the registration from the config (the ``registration`` group completed with the checkpoint's learnt metric
or a baseline) and hands it to :func:`learnsim.evaluate`: for each test pair, fit q_v from scratch with the frozen
metric, draw samples, and let :class:`learnsim.evaluation.evaluator.Evaluator` write ``metrics.csv``, ``per_pair.csv``,
``summary.json``, the NIfTI maps and the figures into the run folder. A VoxelMorph checkpoint is evaluated the
same way (one deterministic sample per pair, optional instance optimisation).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from learnsim.api import resolve_device
from learnsim.checkpoint import ModuleKind, checkpoint_module, load_checkpoint
from learnsim.cli.cohort import is_rank_zero, test_job
from learnsim.cli.config import config_dir, run_guarded, to_container
from learnsim.cli.help import cli_entry, render_help
from learnsim.cli.logger import is_wandb, prepare_wandb
from learnsim.energy_ratio import matched_precision
from learnsim.evaluation.sharding import fabric_settings, launch, run_rank
from learnsim.grid import as_dims
from learnsim.metric_checkpoint import load_learnt_metric
from learnsim.ranges import SPLITS, check_config, warn_ignored_lr

log = logging.getLogger("learnsim.test")


def _dims_or_none(dims: Any) -> list[int] | None:
    return None if dims is None else list(as_dims(dims))


def _compare_with_training(cfg: DictConfig, train_cfg: dict | None) -> list[str]:
    """Settings that differ between the checkpoint's training run and this evaluation (printed, not fatal)."""
    if not train_cfg:
        return []
    notes = []
    checks = {
        "data.dims": (list(as_dims(cfg.data.dims)), _dims_or_none(train_cfg.get("data", {}).get("dims"))),
        "reg_loss.w_reg": (cfg.reg_loss.w_reg, train_cfg.get("reg_loss", {}).get("w_reg")),
        "transformation.no_steps": (cfg.transformation.no_steps, train_cfg.get("transformation", {}).get("no_steps")),
    }
    for key, (now, then) in checks.items():
        if then is not None and now != then:
            notes.append(f"{key} is {now} here but was {then} in training (pass the training run's +experiment=... to match)")
    return notes


def _log_to_wandb(cfg: DictConfig, out_dir: Path, summary: dict) -> None:
    if not is_wandb(cfg.get("logger")):
        return
    try:
        import wandb
    except ImportError:
        return
    mode = prepare_wandb(cfg.logger)
    run = wandb.init(project=cfg.logger.get("project", "learnsim"), name=str(cfg.name), dir=str(out_dir), mode=mode,
                     config=to_container(cfg), job_type="test")
    try:
        import pandas as pd

        run.log({"metrics": wandb.Table(dataframe=pd.read_csv(out_dir / "metrics.csv"))})
        run.log({"per_pair": wandb.Table(dataframe=pd.read_csv(out_dir / "per_pair.csv"))})
        flat = {}
        for k, v in summary.items():
            if isinstance(v, (int, float)):
                flat[f"summary/{k}"] = v
        run.summary.update(flat)
        for png in sorted(out_dir.glob("*.png")):
            run.log({f"figures/{png.stem}": wandb.Image(str(png))})
    finally:
        run.finish()


def _check_settings(cfg: DictConfig) -> None:
    """Refuse out-of-range or mistyped settings, naming the key (``save_nifti=ture`` is not true)."""
    for key in ("save_nifti", "figures", "amp"):
        if not isinstance(cfg.get(key), bool):
            raise ValueError(f"{key} must be true or false; got {cfg.get(key)!r}")
    for key, low in (("q_v.no_iters", 1), ("no_samples", 1), ("no_samples_uncertainty", 0)):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}; got {value!r}")
    if cfg.get("max_pairs") is not None and (not isinstance(cfg.max_pairs, int) or cfg.max_pairs < 1):
        raise ValueError(f"max_pairs must be null or an integer >= 1; got {cfg.max_pairs!r}")
    lr = cfg.get("instance_lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"instance_lr must be null or a number > 0; got {lr!r}")
    if cfg.get("split") not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {cfg.get('split')!r}")
    check_config(cfg)  # every number against the table shared with learnsim-register (learnsim.ranges)
    warn_ignored_lr(cfg, "learnsim-test")


def matched_precision_of(run_dir: str | Path) -> tuple[float, float]:
    """``(weight, rho)`` of a learnt metric's learnsim-test run: the mean ``data_weight`` and ``energy_ratio`` of its
    ``per_pair.csv`` over the pairs it registered (one-line error naming the file or the missing column)."""
    import pandas as pd

    table = Path(run_dir) / "per_pair.csv"
    if not table.is_file():
        raise ValueError(f"matched_to: {table} does not exist (give the learnt metric's learnsim-test run folder)")
    df = pd.read_csv(table)
    for col in ("data_weight", "energy_ratio"):
        if col not in df or df[col].isna().all():
            raise ValueError(f"matched_to: {table} has no {col} column (a run from before learnsim reported it)")
    return float(df["data_weight"].mean()), float(df["energy_ratio"].mean())


def _registration(cfg: DictConfig, device: torch.device) -> tuple[Any, list[str]]:
    """What registers the pairs: the ``registration`` group with the checkpoint's (or the baseline's) metric, or a
    VoxelMorph checkpoint's network; and notes on settings that differ from the checkpoint's training run."""
    if not cfg.ckpt:
        metric = instantiate(cfg.metric).to(device).eval()
        notes = []
        if cfg.get("matched_to"):  # the baseline at a learnt run's matched precision (learnsim.energy_ratio)
            weight, rho = matched_precision_of(cfg.matched_to)
            metric.set_weight_(matched_precision(weight, rho))
            notes.append(f"matched baseline: precision {weight:g} x rho {rho:.4g} = {metric.energy.weight:.4g} "
                         f"(the learnt run {cfg.matched_to})")
        return instantiate(cfg.registration)(metric=metric), notes
    ckpt_path = Path(cfg.ckpt)
    if not ckpt_path.is_file():
        raise SystemExit(f"learnsim-test: checkpoint {ckpt_path} does not exist")
    from learnsim.network_registration import release_registration

    released = release_registration(ckpt_path, device, cfg.get("instance_lr"),
                                    lambda metric: instantiate(cfg.registration)(metric=metric))
    if released is not None:  # a file of the original LearnSim release (learnsim.original_release)
        return released
    raw = load_checkpoint(ckpt_path)  # weights_only=True: no code from the file runs
    notes = _compare_with_training(cfg, raw.get("learnsim_config"))
    if checkpoint_module(raw) is ModuleKind.VOXELMORPH:
        from learnsim.voxelmorph import VoxelMorphModule

        vxm = VoxelMorphModule.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True).eval()
        vxm.metric.to(device).eval()
        if cfg.get("instance_lr") is not None:  # the refinement's step size, for this evaluation only
            vxm.instance_lr = float(cfg.instance_lr)
        return vxm, notes
    metric = load_learnt_metric(ckpt_path, "ckpt").to(device).eval()  # refuses NaN weights
    return instantiate(cfg.registration)(metric=metric), notes


def evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Run the evaluation described by a composed test config (:func:`learnsim.evaluate`); returns the summary."""
    _check_settings(cfg)
    device = resolve_device(cfg.device)
    fabric = fabric_settings(cfg.get("trainer"))  # trainer=ddp trainer.devices=N: the pairs sharded over N ranks
    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test" if cfg.split == "test" else "validate")
    loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
    notes: list[str] = []

    def make_registration(rank_device: torch.device) -> Any:  # each rank its own, on its own device
        registration, found = _registration(cfg, rank_device)
        notes[:] = found
        for note in found if is_rank_zero() else ():
            print(f"learnsim-test: note: {note}")
        return registration

    summary = launch(fabric, partial(run_rank, test_job(cfg, out_dir, loader.dataset, make_registration)), device)
    if summary is None:  # another rank: rank 0 merged and reports
        return {}
    summary["notes"] = notes
    print(summary_line(summary))
    (out_dir / "config.json").write_text(json.dumps(to_container(cfg), indent=2, default=str))
    _log_to_wandb(cfg, out_dir, summary)
    print(f"learnsim-test: results in {out_dir}")
    return summary


def summary_line(summary: dict) -> str:
    """One line from an evaluation summary: mean DSC before -> after registration, folding voxels, seconds per pair."""
    def mean(d: dict | None) -> float | None:
        return None if not d else d.get("mean")

    parts = [f"{summary.get('n_pairs', 0)} pairs"]
    if summary.get("n_failed"):
        parts.append(f"{summary['n_failed']} FAILED (not averaged in; summary.json failed_pairs)")
    before, after = mean(summary.get("before_registration", {}).get("dsc")), mean(summary.get("overall", {}).get("dsc"))
    if after is not None and after == after:
        parts.append(f"DSC {before:.3f} -> {after:.3f}" if before is not None and before == before else f"DSC {after:.3f}")
    fold = summary.get("folding_voxels") or {}
    if fold.get("mean") is not None:
        parts.append(f"{fold['mean']:.1f} folding voxels per pair")
    sec = summary.get("seconds") or {}
    if sec.get("mean") is not None:
        parts.append(f"{sec['mean']:.1f} s per pair")
    return "learnsim-test: " + ", ".join(parts)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="test")
def _main(cfg: DictConfig) -> None:
    run_guarded("learnsim-test", evaluate, cfg)


HELP_KEYS = [
    ("ckpt", "a learnsim (or VoxelMorph) checkpoint: its learnt metric is evaluated"),
    ("metric", "without ckpt: the baseline to evaluate, ssd, lcc or ssd_t"),
    ("likelihood", "auto: each pair's precision learnt inside its fit (from metric.energy.weight)"),
    ("matched_to", "a learnt metric's test run: this baseline at its precision x energy ratio"),
    ("paths.data_dir", "folder with test.csv (and val.csv for split=val)"),
    ("data.dims", "grid the volumes are resampled to, [D,H,W]; match the training run"),
    ("q_v.no_iters", "q_v iterations per test pair (paper: 1024)"),
    ("q_v", "q_v=c2f: coarse-to-fine (3 levels, 200/100/50 iterations); default: one level (the paper's)"),
    ("q_v.levels", "pyramid levels (1: single level); q_v.level_iters / q_v.level_lr per level, coarsest first"),
    ("no_samples", "posterior samples per pair for DSC / ASD / HD95"),
    ("no_samples_uncertainty", "posterior samples per pair for the uncertainty map"),
    ("split", "test or val"),
    ("max_pairs", "evaluate only the first N pairs"),
    ("hydra.run.dir", "the run folder: the same command there again skips the pairs already complete"),
    ("fresh", "true: start over in the run folder (removes only learnsim's outputs there)"),
    ("trainer", "ddp (GPUs) or ddp_sim (CPU) with trainer.devices=N, trainer.num_nodes=M: pairs sharded over ranks"),
    ("device", "auto, cpu or cuda"),
    ("instance_optimisation_iters", "VoxelMorph checkpoints: Adam steps refining the network's velocity per pair"),
    ("instance_lr", "their learning rate (null: the checkpoint's model.instance_lr)"),
    ("name", "run name: the folder runs/test/<name>/<time> and the legend of plots"),
]


def help_text() -> str:
    """The ``learnsim-test --help`` page."""
    return render_help(
        "learnsim-test",
        "learnsim-test: register the held-out pairs with a learnt metric (ckpt=...) or a baseline (metric=ssd|lcc)\n"
        "and write metrics.csv, per_pair.csv, summary.json, NIfTI maps and figures (per pair: output_grid.png,\n"
        "label_overlay.png) to runs/test/<name>/<time>/. Compare runs with learnsim-compare.",
        [
            "learnsim-test [+experiment=NAME] (ckpt=PATH | metric=ssd|lcc) [GROUP=OPTION ...] [KEY=VALUE ...]",
            "learnsim-test +experiment=demo ckpt=runs/train/.../checkpoints/last.ckpt name=learnt_ssd",
            "learnsim-test +experiment=ssd paths.data_dir=ukbb_128 metric=ssd name=SSD_baseline",
        ],
        "test",
        HELP_KEYS,
    )


main = cli_entry(_main, help_text)  # the console script's entry point


if __name__ == "__main__":
    main()
