"""A tiny random open_clip model saved to disk, loaded back through the user's code path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# ViT image tower of 1 layer on 32² inputs, text tower of 1 layer; OpenAI's BPE vocabulary
# (open_clip's default tokenizer emits ids up to 49407, so the vocabulary size must stay).
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def save_tiny_clip(
    directory: Path, name: str = "asd3d-tiny-clip", seed: int = 0
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (model config) and ``<name>.bin`` (random weights); return both."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = directory / f"{name}.bin"
    torch.save(model.state_dict(), weights)
    return config, weights
