"""``learnsim-train +experiment=ssd [overrides]``: compose the config, build data / model / trainer, fit."""

from __future__ import annotations

import logging
import os

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from learnsim.cli.config import config_dir, to_container

log = logging.getLogger("learnsim.train")


def build_logger(cfg: DictConfig):
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if "WandbLogger" in cfg.logger._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")
    return instantiate(cfg.logger)


def train(cfg: DictConfig) -> dict:
    """Run training for a composed config; returns the trainer's last logged metrics and the checkpoint path."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = to_container(cfg)  # stored in every checkpoint: learnsim-test rebuilds the run from it
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    logger = build_logger(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        logger.log_hyperparams(to_container(cfg))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    if trainer.is_global_zero:
        log.info("last checkpoint: %s", ckpt)
        print(f"learnsim-train: last checkpoint {ckpt}")
    return {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "ckpt": ckpt}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
