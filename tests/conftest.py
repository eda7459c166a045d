"""Shared fixtures: the real Hydra configs, composed and shrunk for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_CORPORA = REPO.parent / "shared" / "corpora"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_flush_denormal(True)

# A few seconds per step-based test: the quickstart world, smaller still.
TINY = [
    "experiment=quickstart",
    "logger=csv",
    "corpus.num_prompts=4",
    "corpus.num_test_prompts=4",
    "system.render_resolution=16",
    "system.prompts_per_step=2",
    "system.validation.num_views=4",
    "system.image_every_n_steps=0",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=3",
]


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``train.py`` would, with outputs under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.corpora_dir = str(SHARED_CORPORA)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def bare_trainer(max_steps: int, **overrides) -> pl.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints or progress bar); validation off unless asked."""
    settings = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        use_distributed_sampler=False,
    )
    return pl.Trainer(**{**settings, **overrides})


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    return compose_train(TINY, tmp_path / "run")


@pytest.fixture
def shared_corpora() -> Path:
    if not SHARED_CORPORA.exists():
        pytest.skip(f"paper corpora not found at {SHARED_CORPORA}")
    return SHARED_CORPORA
