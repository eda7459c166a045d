"""Tiny random Stable Diffusion components in the diffusers layout, for weight-free CPU tests.

``save_tiny_sd(root, prediction_type)`` writes ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``
(and ``model_index.json``) under ``root``, the layout of ``stabilityai/stable-diffusion-2-1-base``
on the Hub, so :class:`asd3d.prior.stable_diffusion.StableDiffusionPrior` loads it through exactly
the code path it uses for the real weights. Shapes are SD 2.x's, shrunk: 4 latent channels, a
linear-projection cross-attention UNet, a 77-token CLIP text tower whose width (32) plays the role
of the real 1024. The VAE downsamples by 2 (SD's by 8), so 16^2 renders give 8^2 latents.

The tokenizer is the real SD 2.x tokenizer (OpenCLIP's BPE, 49,408 tokens), rebuilt offline from
the BPE file open_clip ships (STACK.md): ids match the Hub tokenizer's, so the EOS position and
the padding behave as with the real model.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

TEXT_DIM = 32  # hidden width of the tiny text encoder = cross-attention width of the tiny UNet
LATENT_SIZE = 8  # latent side for renders at RESOLUTION
RESOLUTION = 16  # the tiny VAE's input side (it downsamples by 2)
MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the BPE's base alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the CLIP / OpenCLIP BPE, read from open_clip's packaged file."""
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe()) as file:
        lines = file.read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: 49152 - 256 - 2 merges after the header line.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]  # the Hub's names for SOT / EOT
    return {token: i for i, token in enumerate(vocab_list)}, merges  # type: ignore[return-value]


def tiny_components(seed: int = 0) -> dict[str, object]:
    """Random tiny UNet, VAE, text encoder and the real tokenizer (no scheduler)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_bpe()
    # SD 2.x pads with "!" (id 0) instead of EOS, so only the first EOS marks the text's end.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        pad_token="!",
        model_max_length=MAX_TOKENS,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SD 2.x
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="gelu",  # SD 2.x's OpenCLIP tower (OpenAI CLIP uses quick_gelu)
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=0,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def tiny_scheduler(prediction_type: str):
    """SD 2.1's training schedule (scaled-linear 0.00085 -> 0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def save_tiny_sd(
    root: Path, prediction_type: str = "epsilon", components: dict[str, object] | None = None
) -> Path:
    """Write the tiny model to ``root`` in the diffusers layout and return ``root``."""
    components = components or tiny_components()
    root.mkdir(parents=True, exist_ok=True)
    for name, component in components.items():
        component.save_pretrained(root / name)  # type: ignore[attr-defined]
    tiny_scheduler(prediction_type).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            },
            indent=2,
        )
    )
    return root
