"""A tiny random MVDream in the release's file formats, for weight-free CPU tests.

``save_tiny_mvdream(root)`` writes what a user downloads, shrunk:

* ``root / "sd21_base"``: SD 2.1-base's diffusers parts (``vae/ text_encoder/ tokenizer/
  scheduler/``, no ``unet/``: the MVDream prior never reads it), from ``tiny_sd.py``;
* ``root / "sd-v2.1-base-4view.pt"``: a single-file LDM checkpoint with the multi-view UNet under
  ``model.diffusion_model.`` plus stand-ins for the VAE / text-encoder / schedule entries the
  real file also holds, ``torch.save``d as the release's is;
* ``root / "sd-v2.1-base-4view.safetensors"``: the same tensors as safetensors.

The UNet's zero-initialised residual branches are randomised: with the release's zero init every
transformer is the identity, and cross-view effects would be invisible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd import TEXT_DIM, save_tiny_sd, tiny_components  # noqa: E402

from asd3d.prior.mvdream_unet import (  # noqa: E402
    MVDREAM_SD21_BASE_4VIEW_CONFIG,
    UNET_PREFIX,
    MultiViewUNet,
)

TINY_UNET_CONFIG = {
    **MVDREAM_SD21_BASE_4VIEW_CONFIG,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "context_dim": TEXT_DIM,
}
# The same config as Hydra overrides of conf/prior/mvdream.yaml's `unet:` block.
TINY_UNET_OVERRIDES = [
    "prior.unet.model_channels=32",
    "prior.unet.channel_mult=[1,2]",
    "prior.unet.attention_resolutions=[1,2]",
    "prior.unet.num_res_blocks=1",
    "prior.unet.num_head_channels=8",
]


def tiny_multiview_unet(seed: int = 0) -> MultiViewUNet:
    """The tiny UNet with every parameter random (zero-initialised ones included)."""
    torch.manual_seed(seed)
    unet = MultiViewUNet(**TINY_UNET_CONFIG).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return unet


def official_checkpoint(unet: MultiViewUNet) -> dict[str, torch.Tensor]:
    """``unet``'s weights in the layout of ``sd-v2.1-base-4view.pt``."""
    state = {UNET_PREFIX + key: value.clone() for key, value in unet.state_dict().items()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(16, TEXT_DIM)
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return state


def save_tiny_mvdream(root: Path, seed: int = 0) -> dict[str, object]:
    """Write the tiny model under ``root``; return the paths and the in-memory UNet."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    components = tiny_components(seed)
    components.pop("unet")
    sd_dir = save_tiny_sd(root / "sd21_base", "epsilon", components)
    unet = tiny_multiview_unet(seed)
    state = official_checkpoint(unet)
    checkpoint = root / "sd-v2.1-base-4view.pt"
    torch.save(state, checkpoint)
    safetensors = root / "sd-v2.1-base-4view.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors))
    return {
        "pretrained": sd_dir,
        "checkpoint": checkpoint,
        "safetensors": safetensors,
        "unet": unet,
        "components": components,
    }
