"""The body of ``train.py``: build the run from its config, fit, say where the results are."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from asd3d.build import build_system
from asd3d.callbacks import TrainingStopped
from asd3d.checkpoint import RunRecipe, check_loadable_state
from asd3d.cli import remember_ddp_job_argv, user_errors
from asd3d.io import CheckpointError, load_checkpoint
from asd3d.loggers import run_id_of
from asd3d.schema import validate_train_config


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` node, dropping ``None`` results."""
    if not node:
        return []
    built = (instantiate(value) for value in node.values() if "_target_" in value)
    return [obj for obj in built if obj is not None]


def run_training(cfg: DictConfig) -> float | None:
    """Fit the configured system; returns the final oracle R@1 when the corpus has an oracle.

    A resumed run (``ckpt_path``) continues the checkpoint's W&B run; its config was already
    rebuilt from the checkpoint's recipe by ``train.py`` (:func:`asd3d.checkpoint.resume_argv`).
    """
    # Empty space in a volume renders to denormal floats that slow CPU steps several-fold.
    torch.set_flush_denormal(True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(output_dir):
        validate_train_config(cfg)
        wandb_cfg = cfg.logger.get("wandb") if cfg.get("logger") else None
        # The run's W&B id: WANDB_RUN_ID, else one derived from the run directory.
        wandb_id = (wandb_cfg and wandb_cfg.get("run_id")) or run_id_of(output_dir)
        if cfg.ckpt_path is not None:
            where = f"checkpoint {cfg.ckpt_path}"
            resumed = load_checkpoint(Path(cfg.ckpt_path))  # fail early, with one line
            wandb_id = RunRecipe.from_checkpoint(resumed, where).wandb_id or wandb_id
        recipe = RunRecipe.of_this_run(wandb_id)
        if wandb_cfg is not None:
            with open_dict(cfg):
                cfg.logger.wandb.run_id = wandb_id  # a resumed run continues its W&B run
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        run_config: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        system = build_system(cfg, run_config)
        system.run_recipe = recipe.as_dict()
        if cfg.ckpt_path is not None:
            check_loadable_state(system, resumed["state_dict"], where)
            del resumed
        loggers = instantiate_all(cfg.get("logger"))
        callbacks = instantiate_all(cfg.get("callbacks"))
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
        for logger in loggers:
            # The resolved config as the run's hyperparameters: W&B can filter/group by any key
            # (distiller.eta, generator, ...); the CSV logger writes it to hparams.yaml.
            logger.log_hyperparams(run_config)
    remember_ddp_job_argv()
    try:
        trainer.fit(system, ckpt_path=cfg.ckpt_path)
    except (TrainingStopped, CheckpointError) as stop:
        prefix = stop.prefix if isinstance(stop, TrainingStopped) else "error"
        print(f"{prefix}: {' '.join(str(stop).split())}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code if isinstance(stop, TrainingStopped) else 1) from None
    if trainer.is_global_zero:
        print(f"Run directory: {output_dir}")
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            print(f"Checkpoint:    {last} (step {trainer.global_step})")
            print(f"Evaluate with: python evaluate.py ckpt={last}")
            print(f"Resume with:   python train.py ckpt_path={last}")
    r1 = trainer.callback_metrics.get("val/oracle_r1")
    return float(r1) if r1 is not None else None
