"""Shared by the claim-command tests: their configs composed and shrunk, and a tiny miniature
prior trained in seconds (as tests/prior/test_miniature.py does)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from asd3d.miniature.training import run_prior_training

from conftest import CONF, REPO

# A 3-prompt world at 8² with cheap ground truth: each claim command runs in seconds.
TINY_CLAIM = [
    "corpus.num_prompts=3",
    "corpus.num_test_prompts=3",
    "system.render_resolution=8",
    "ground_truth.num_samples_stratified=8",
    "ground_truth.num_samples_importance=4",
    "progress=false",
    "device=cpu",
]
# The procedural prior's unconditional mixture, shrunk to 2 scenes (it renders each per call).
TINY_PROCEDURAL = ["prior=procedural", "prior.mixture_size=2"]

# A 3-prompt miniature prior at 8², a UNet of a few thousand parameters (tests/prior/
# test_miniature.py's settings, with more steps so that it is not the untrained network).
TINY_PRIOR = [
    "corpus.num_prompts=3",
    "corpus.num_test_prompts=3",
    "data.resolution=8",
    "data.views_per_prompt=4",
    "ground_truth.num_samples_stratified=8",
    "ground_truth.num_samples_importance=4",
    "unet.block_out_channels=[8,8,16]",
    "unet.norm_num_groups=4",
    "unet.cross_attention_dim=16",
    "unet.attention_head_dim=2",
    "train.batch_size=4",
    "train.max_steps=20",
    "train.warmup_steps=1",
    "train.log_every_n_steps=10",
    "train.checkpoint_every_n_steps=20",
    "evaluation.num_cameras=1",
    "evaluation.num_inference_steps=2",
    "evaluation.error_curve_points=0",
]


def _point_outputs_at(cfg: DictConfig, output_dir: Path) -> DictConfig:
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
        if "hydra" in cfg:
            cfg.hydra.runtime.output_dir = str(output_dir)
    return cfg


def compose_claim(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """``conf/claims/<name>.yaml`` composed as its command would, outputs in ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(f"claims/{name}", overrides=overrides, return_hydra_config=True)
    cfg = _point_outputs_at(cfg, output_dir)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.prior} resolves
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_tiny_miniature_prior(output_dir: Path) -> Path:
    """Train and export a tiny miniature prior; returns its directory (``prior.pretrained``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train_prior", overrides=TINY_PRIOR)
    cfg = _point_outputs_at(cfg, output_dir)
    run_prior_training(cfg)
    return Path(cfg.export_dir)
