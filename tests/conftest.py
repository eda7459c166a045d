"""Shared fixtures: the real Hydra configs, composed and shrunk for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from asd3d.build import compose_train_config, quiet_cpu_trainer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_CORPORA = REPO.parent / "shared" / "corpora"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_flush_denormal(True)

# A few seconds per step-based test: the quickstart world, smaller still.
TINY = [
    "experiment=quickstart_exact",
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
    return compose_train_config(overrides, output_dir, corpora_dir=SHARED_CORPORA)


def bare_trainer(max_steps: int, **overrides) -> pl.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints or progress bar); validation off unless asked."""
    return quiet_cpu_trainer(max_steps, **overrides)


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    return compose_train(TINY, tmp_path / "run")


@pytest.fixture
def shared_corpora() -> Path:
    if not SHARED_CORPORA.exists():
        pytest.skip(f"paper corpora not found at {SHARED_CORPORA}")
    return SHARED_CORPORA
