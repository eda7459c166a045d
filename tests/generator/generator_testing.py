"""Helpers for generator tests: the production YAMLs, composed and shrunk to CPU size."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from asd3d.generator.hashgrid import HashGridEncoding
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
    "triplane": dict(
        text_dim=16,
        width=16,
        num_layers=2,
        num_heads=2,
        mlp_ratio=2.0,
        token_resolution=4,
        feature_dim=4,
        decoder_hidden=8,
    ),
    # Hash grids of 3 levels (dense, dense, hashed) with 256-entry tables, pure-PyTorch backend.
    "hyper_ingp": dict(
        text_dim=16,
        n_levels=3,
        log2_hashmap_size=8,
        base_resolution=4,
        per_level_scale=2.0,
        hypernet_hidden_features=8,
        decoder_hidden=8,
        grid_backend="torch",
    ),
    "ingp": dict(
        n_levels=3,
        log2_hashmap_size=8,
        base_resolution=4,
        per_level_scale=2.0,
        decoder_hidden=8,
        grid_backend="torch",
    ),
}

# Prompt-specific generators read no text: one field for every prompt of a batch.
PROMPT_SPECIFIC = frozenset({"ingp"})


def generator_yaml_names() -> list[str]:
    """Generator configs with their own class settings; size variants that extend another
    config through a defaults list (``3dconv_small``) are covered by the config they extend."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if "defaults" not in OmegaConf.load(p))


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
    generator = hydra.utils.instantiate(cfg)
    encoding = getattr(generator, "encoding", None)
    if isinstance(encoding, HashGridEncoding):
        # tiny-cuda-nn's +-1e-4 init makes every prompt's field nearly the sphere bias at step 0;
        # O(1) table values stand in for a trained grid so text effects are measurable.
        with torch.no_grad():
            encoding.params.uniform_(-1.0, 1.0)
    return generator


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


# ---- command-line runs of the hash-grid generators on the tiny quickstart settings


# A small grid for CPU runs: 8 levels, 2^14 entries, resolutions 8 -> 8 * 1.5^7 ~ 137.
SMALL_GRID = [
    "generator.n_levels=8",
    "generator.log2_hashmap_size=14",
    "generator.base_resolution=8",
    "generator.per_level_scale=1.5",
    "generator.grid_backend=torch",
]

# NeRF renders carry no SDF gradients: no eikonal probes and no eikonal term.
NERF = ["renderer=nerf", "~renderer.eikonal_points", "system.regularisers.eikonal=0"]


def generator_overrides(name: str, renderer: str = "volsdf") -> list[str]:
    """``generator=<name>`` on top of ``experiment=quickstart``: drops the quickstart's keys for
    the 3DConv-net that ``<name>`` does not take, shrinks the grid, and for ``renderer=nerf``
    swaps the renderer."""
    quickstart = OmegaConf.load(CONF_DIR.parent / "experiment" / "quickstart.yaml")
    own = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    foreign = [k for k in quickstart.get("generator", {}) if k not in own]
    overrides = [f"generator={name}", *[f"~generator.{k}" for k in foreign], *SMALL_GRID]
    return overrides + (NERF if renderer == "nerf" else [])
