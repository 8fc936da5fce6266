"""``learnsim-train +experiment=ssd [overrides]``: compose the config, build data / model / trainer, fit."""

from __future__ import annotations

import logging
import os

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from learnsim.checkpoint_io import use_atomic_checkpoints
from learnsim.cli.config import config_dir, run_guarded, to_container
from learnsim.cli.help import cli_entry, render_help
from learnsim.cli.logger import is_wandb, prepare_wandb
from learnsim.ranges import check_config, warn_ignored_lr

log = logging.getLogger("learnsim.train")


def build_logger(cfg: DictConfig):
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if is_wandb(cfg.logger):
        prepare_wandb(cfg.logger)
    return instantiate(cfg.logger)


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint written last by any of the trainer's ModelCheckpoint callbacks (the end of training), or None."""
    paths = {p for c in trainer.checkpoint_callbacks for p in (c.last_model_path, c.best_model_path) if p}
    paths = [p for p in paths if os.path.isfile(p)]
    return max(paths, key=os.path.getmtime) if paths else None


def train(cfg: DictConfig) -> dict:
    """Run training for a composed config; returns the trainer's last logged metrics and the checkpoint path."""
    check_config(cfg)  # every number against the table shared with learnsim-register / learnsim-test
    warn_ignored_lr(cfg, "learnsim-train")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = to_container(cfg)  # stored in every checkpoint: learnsim-test rebuilds the run from it
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    if cfg.get("logger") and is_wandb(cfg.logger):
        # wandb writes its offline run into the run folder as soon as Lightning starts: read and check the pair
        # lists first, so that a run refused on its data leaves no folder behind (setup is idempotent)
        datamodule.setup("fit")
    logger = build_logger(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    use_atomic_checkpoints(trainer)  # last.ckpt written beside itself and renamed: a full disk never damages it
    if logger:
        logger.log_hyperparams(to_container(cfg))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit as exc:  # Lightning ends a Ctrl-C (or SIGTERM) with exit(1): give it back as the interrupt
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise
    ckpt = last_checkpoint(trainer)
    if trainer.is_global_zero:
        log.info("last checkpoint: %s", ckpt)
        print(f"learnsim-train: last checkpoint {ckpt}")
    return {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "ckpt": ckpt}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _main(cfg: DictConfig) -> None:
    run_guarded("learnsim-train", train, cfg)


HELP_KEYS = [
    ("paths.data_dir", "folder with train.csv / val.csv / test.csv (learnsim-data writes one)"),
    ("data.dims", "grid the volumes are resampled to, [D,H,W] (paper: [128,128,128])"),
    ("trainer.max_epochs", "epochs (paper: 50)"),
    ("q_v.no_iters", "q_v iterations per pair and training step (paper: 1024)"),
    ("no_iters_val", "q_v iterations for a validation pair"),
    ("metric", "the metric to learn: cnn_ssd / cnn_lcc / cnn_ssd_t (ssd / lcc / ssd_t: baselines, q_v only)"),
    ("likelihood", "fixed (metric.energy.weight as given) / vb (the precision learnt over the pairs) / auto"),
    ("ckpt_path", "resume from a checkpoint (runs/train/<name>/<time>/checkpoints/last.ckpt)"),
    ("trainer", "cpu, gpu, or ddp with trainer.devices=N"),
    ("logger", "wandb (offline), wandb_online, csv, none"),
    ("name", "run name: the folder runs/train/<name>/<time>"),
]


def help_text() -> str:
    """The ``learnsim-train --help`` page."""
    return render_help(
        "learnsim-train",
        "learnsim-train: learn a similarity metric jointly with each pair's q_v (Grzech et al., CVPR 2022), or fit\n"
        "q_v with a baseline metric. Checkpoints and logs go to runs/train/<name>/<time>/.",
        [
            "learnsim-train +experiment=NAME [GROUP=OPTION ...] [KEY=VALUE ...]",
            "learnsim-train +experiment=demo paths.data_dir=demo_data            # the CPU demo",
            "learnsim-train +experiment=ssd paths.data_dir=ukbb_128 trainer=gpu   # the paper's settings",
        ],
        "train",
        HELP_KEYS,
    )


main = cli_entry(_main, help_text)  # the console script's entry point


if __name__ == "__main__":
    main()
