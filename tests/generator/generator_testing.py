"""Helpers for generator tests: the production YAMLs, composed and shrunk to CPU size."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from asd3d.types import PromptBatch

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "generator"

# Per-YAML overrides that shrink a production config to a few-thousand-parameter model while
# keeping every code path (bias tensors, noise, several blocks). A new generator YAML must add
# an entry here to join the conformance suite.
SMALL_OVERRIDES: dict[str, dict] = {
    "3dconv": dict(
        text_dim=16,
        z_dim=8,
        w_dim=16,
        channels={4: 8, 8: 8, 16: 4},
        output_resolution=16,
        bias_max_resolution=8,
        feature_dim=4,
        decoder_hidden=8,
    ),
}


def generator_yaml_names() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def load_generator_config(name: str, **overrides):
    """The YAML ``conf/generator/<name>.yaml`` with top-level keys replaced (not instantiated).

    Values replace rather than merge, so an override's channel table is the whole table.
    """
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def build_small_generator(name: str, **overrides) -> torch.nn.Module:
    """Instantiate the shrunk generator of ``conf/generator/<name>.yaml`` with a fixed init."""
    if name not in SMALL_OVERRIDES:
        pytest.fail(
            f"tests/generator/generator_testing.py: add SMALL_OVERRIDES[{name!r}] for "
            f"conf/generator/{name}.yaml"
        )
    torch.manual_seed(0)
    cfg = load_generator_config(name, **{**SMALL_OVERRIDES[name], **overrides})
    return hydra.utils.instantiate(cfg)


def make_prompts(num_prompts: int, text_dim: int, tokens: int = 5, seed: int = 0) -> PromptBatch:
    """Random text embeddings for ``num_prompts`` prompts (both pooled and token states)."""
    g = torch.Generator().manual_seed(seed)
    return PromptBatch(
        ids=torch.arange(num_prompts),
        texts=tuple(f"prompt {i}" for i in range(num_prompts)),
        tokens=torch.randn(num_prompts, tokens, text_dim, generator=g),
        pooled=torch.randn(num_prompts, text_dim, generator=g),
    )


def random_points(
    num_prompts: int, num_points: int, radius: float = 2.0, seed: int = 1
) -> torch.Tensor:
    """Points uniform in the scene box ``[-radius, radius]^3``, grouped per prompt."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_prompts, num_points, 3, generator=g) * 2 - 1) * radius
