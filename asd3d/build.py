"""Instantiate the parts of a run from its (Hydra) config: one place for train.py and evaluate.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from asd3d.corpus.base import Corpus
from asd3d.evaluation.procedural import ProceduralOracle
from asd3d.generator.base import Generator
from asd3d.prior.base import Prior
from asd3d.renderer.base import VolumeRenderer


@dataclass
class Parts:
    """The parts every entry point needs; the distiller is only built for training."""

    corpus: Corpus
    prior: Prior
    generator: Generator
    renderer: VolumeRenderer
    oracle: ProceduralOracle | None


def as_config(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


REPO = Path(__file__).resolve().parents[1]


def compose_train_config(
    overrides: list[str], output_dir: Path, corpora_dir: Path | None = None
) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``train.py`` would, outside a Hydra app (tests, bench).

    Outputs go under ``output_dir``; ``${hydra:...}`` interpolations resolve as in a run.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(output_dir)
        if corpora_dir is not None:
            cfg.paths.corpora_dir = str(corpora_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def quiet_cpu_trainer(max_steps: int, **overrides: Any):
    """A CPU Trainer without logger, checkpoints, progress bar or validation (unless overridden),
    for benchmarks and tests that drive a system directly. Files a system writes (image grids,
    videos) go to a fresh temporary directory unless ``default_root_dir`` is given."""
    import tempfile

    import pytorch_lightning as pl

    settings: dict[str, Any] = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        use_distributed_sampler=False,
        default_root_dir=overrides.pop("default_root_dir", None)
        or tempfile.mkdtemp(prefix="asd3d-quiet-"),
    )
    return pl.Trainer(**{**settings, **overrides})


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """A ``device`` option: ``auto`` (this process's GPU when CUDA is available, else CPU),
    ``cpu``, ``cuda`` (GPU ``local_rank``) or ``cuda:<index>``."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return torch.device("cuda", local_rank)
    if setting == "cpu" or re.fullmatch(r"cuda:\d+", setting):
        return torch.device(setting)
    raise ValueError(f"device={setting!r} is not one of auto, cpu, cuda, cuda:<index>")


def build_prior(cfg: DictConfig, corpus: Corpus) -> Prior:
    """The configured prior; priors that need the corpus (the procedural one) get ``corpus``."""
    prior_kwargs = {"corpus": corpus} if "corpus" in cfg.prior else {}
    return instantiate(cfg.prior, **prior_kwargs)


def build_parts(cfg: DictConfig) -> Parts:
    """Build corpus, prior, generator, renderer and (procedural corpora) the oracle."""
    corpus = instantiate(cfg.corpus)
    prior = build_prior(cfg, corpus)
    generator = instantiate(cfg.generator)
    renderer = instantiate(cfg.renderer)
    oracle = (
        ProceduralOracle(corpus, instantiate(cfg.ground_truth))
        if ProceduralOracle.applies_to(corpus)
        else None
    )
    return Parts(corpus=corpus, prior=prior, generator=generator, renderer=renderer, oracle=oracle)


def build_system(cfg: DictConfig, run_config: dict[str, Any]):
    """Build the LightningModule of a training run."""
    parts = build_parts(cfg)
    distiller = instantiate(cfg.distiller)
    system = instantiate(
        cfg.system,
        corpus=parts.corpus,
        generator=parts.generator,
        renderer=parts.renderer,
        prior=parts.prior,
        distiller=distiller,
        oracle=parts.oracle,
    )
    # Set after instantiation: Hydra would try to instantiate the _target_ nodes inside it.
    system.run_config = run_config
    return system
