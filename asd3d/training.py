"""The body of ``train.py``: build the run from its config, fit, say where the results are."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from asd3d.build import build_system
from asd3d.cli import remember_ddp_job_argv, user_errors
from asd3d.io import load_checkpoint


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` node, dropping ``None`` results."""
    if not node:
        return []
    built = (instantiate(value) for value in node.values() if "_target_" in value)
    return [obj for obj in built if obj is not None]


def run_training(cfg: DictConfig) -> float | None:
    """Fit the configured system; returns the final oracle R@1 when the corpus has an oracle."""
    # Empty space in a volume renders to denormal floats that slow CPU steps several-fold.
    torch.set_flush_denormal(True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(output_dir):
        if cfg.ckpt_path is not None:
            load_checkpoint(Path(cfg.ckpt_path))  # fail early, with one line, on a bad file
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        run_config: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        system = build_system(cfg, run_config)
        loggers = instantiate_all(cfg.get("logger"))
        callbacks = instantiate_all(cfg.get("callbacks"))
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
        for logger in loggers:
            # The resolved config as the run's hyperparameters: W&B can filter/group by any key
            # (distiller.eta, generator, ...); the CSV logger writes it to hparams.yaml.
            logger.log_hyperparams(run_config)
    remember_ddp_job_argv()
    trainer.fit(system, ckpt_path=cfg.ckpt_path)
    if trainer.is_global_zero:
        print(f"Run directory: {output_dir}")
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            print(f"Checkpoint:    {last}")
            print(f"Evaluate with: python evaluate.py ckpt={last}")
    r1 = trainer.callback_metrics.get("val/oracle_r1")
    return float(r1) if r1 is not None else None
