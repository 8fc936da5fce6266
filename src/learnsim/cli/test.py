"""``learnsim-test ckpt=PATH [+experiment=...] [overrides]`` or ``learnsim-test metric=ssd|lcc``: evaluation.

For each test pair: fit q_v from scratch with the frozen metric (learnt from the checkpoint, or a baseline),
draw samples, warp image and segmentation per sample, and hand everything to
:class:`learnsim.evaluation.evaluator.Evaluator`, which writes ``metrics.csv``, ``per_pair.csv``,
``summary.json``, the NIfTI maps and the figures into the run folder. A VoxelMorph checkpoint is evaluated the
same way (one deterministic sample per pair, optional instance optimisation).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from learnsim.api import load_checkpoint, load_metric, resolve_device
from learnsim.cli.config import config_dir, run_guarded, to_container
from learnsim.cli.help import render_help, wants_help
from learnsim.cli.logger import is_wandb, prepare_wandb
from learnsim.evaluation.evaluator import Evaluator
from learnsim.registration import FitProgress, VariationalRegistration

log = logging.getLogger("learnsim.test")


def _is_voxelmorph(ckpt: dict) -> bool:
    return any(k.startswith("net.") for k in ckpt.get("state_dict", {}))


def _compare_with_training(cfg: DictConfig, train_cfg: dict | None) -> list[str]:
    """Settings that differ between the checkpoint's training run and this evaluation (printed, not fatal)."""
    if not train_cfg:
        return []
    notes = []
    checks = {
        "data.dims": (list(cfg.data.dims), train_cfg.get("data", {}).get("dims")),
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


def evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Run the evaluation described by a composed test config; returns the summary dict."""
    _check_settings(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(out_dir or HydraConfig.get().runtime.output_dir)
    notes: list[str] = []

    vxm = None
    if cfg.ckpt:
        ckpt_path = Path(cfg.ckpt)
        if not ckpt_path.is_file():
            raise SystemExit(f"learnsim-test: checkpoint {ckpt_path} does not exist")
        raw = load_checkpoint(ckpt_path)  # weights_only=True: no code from the file runs
        if _is_voxelmorph(raw):
            from learnsim.voxelmorph import VoxelMorphModule

            vxm = VoxelMorphModule.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True).eval()
            metric = vxm.metric
        else:
            metric = load_metric(ckpt_path)
        notes += _compare_with_training(cfg, raw.get("learnsim_config"))
        del raw
    else:
        metric = instantiate(cfg.metric)
    metric = metric.to(device).eval()

    datamodule = instantiate(cfg.data)
    datamodule.setup("test" if cfg.split == "test" else "validate")
    loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()

    registration = VariationalRegistration(
        metric,
        instantiate(cfg.transformation),
        instantiate(cfg.reg_loss),
        instantiate(cfg.sobolev).to(device),
        no_iters=cfg.q_v.no_iters,
        lr=cfg.optimizer.q_v.lr,
        sigma_init=cfg.q_v.sigma_init,
        u_init=cfg.q_v.u_init,
        rank=cfg.q_v.rank,
        uniform_noise=0.0,  # never at test time
        amp=cfg.amp,
        levels=int(cfg.q_v.get("levels", 1)),
        level_iters=None if cfg.q_v.get("level_iters") is None else [int(n) for n in cfg.q_v.level_iters],
        level_lr=None if cfg.q_v.get("level_lr") is None else [float(x) for x in cfg.q_v.level_lr],
    )
    evaluator = Evaluator(
        out_dir, save_nifti=cfg.save_nifti, figures=cfg.figures, seed=cfg.seed, metric_samples=cfg.no_samples,
        run_name=str(cfg.name),
    )
    n_draw = max(int(cfg.no_samples), int(cfg.no_samples_uncertainty))
    for note in notes:
        print(f"learnsim-test: note: {note}")
    for i, batch in enumerate(loader):
        if cfg.max_pairs is not None and i >= cfg.max_pairs:
            break
        fixed = batch["fixed"].to(device)
        moving = batch["moving"].to(device)
        mask = batch["fixed_mask"].to(device)
        shape = moving.shape[2:]
        if vxm is not None:
            mean_disp, samples, seconds = vxm.register_batch(fixed, moving, mask, no_samples=1,
                                                             instance_optimisation_iters=int(cfg.get("instance_optimisation_iters", 0)))
            extra = {}
        else:
            t0 = time.perf_counter()
            with FitProgress(sum(registration.schedule.iters), desc=f"q_v {batch['pair_id'][0]}") as bar:
                fit = registration.fit_levels(fixed, moving, mask, training=False, progress=bar, log_every=4,
                                              on_level=bar.on_level)
            mean_disp = registration.mean_displacement(fit.params, shape)
            samples = registration.sample_displacements(fit.params, shape, n_draw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            extra = {"final_loss": float(fit.loss.mean()), "fit_seconds": fit.seconds}
        has_seg = bool(batch["has_seg"][0])
        row = evaluator.add_pair(
            str(batch["pair_id"][0]),
            fixed.cpu(), moving.cpu(),
            batch["fixed_seg"] if has_seg else None,
            batch["moving_seg"] if has_seg else None,
            batch["fixed_mask"], batch["affine"][0],
            samples.cpu(), mean_disp.cpu(), seconds, extra,
        )
        print(f"learnsim-test: pair {batch['pair_id'][0]}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "pair"))
    summary = evaluator.finalize()
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
    ("metric", "without ckpt: the baseline to evaluate, ssd or lcc"),
    ("paths.data_dir", "folder with test.csv (and val.csv for split=val)"),
    ("data.dims", "grid the volumes are resampled to, [D,H,W]; match the training run"),
    ("q_v.no_iters", "q_v iterations per test pair (paper: 1024)"),
    ("q_v", "q_v=c2f: coarse-to-fine (3 levels, 200/100/50 iterations); default: one level (the paper's)"),
    ("q_v.levels", "pyramid levels (1: single level); q_v.level_iters / q_v.level_lr per level, coarsest first"),
    ("no_samples", "posterior samples per pair for DSC / ASD / HD95"),
    ("no_samples_uncertainty", "posterior samples per pair for the uncertainty map"),
    ("split", "test or val"),
    ("max_pairs", "evaluate only the first N pairs"),
    ("device", "auto, cpu or cuda"),
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


def main() -> None:
    if wants_help(sys.argv[1:]):
        print(help_text(), end="")
        return
    _main()


if __name__ == "__main__":
    main()
