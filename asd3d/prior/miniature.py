"""The miniature learned prior: a small camera-conditioned pixel-space diffusion UNet trained on
procedural renders by ``python train_prior.py`` (docs/miniature-prior.md).

Unlike the exact procedural prior it is a learned network with a noise-prediction error that
varies with ``t`` (paper Fig. 2), loaded through the same diffusers code path as SD
(``UNet2DConditionModel.from_pretrained``). It works on renders themselves (``[-1, 1]`` pixels at
its training resolution, no VAE), reads the world's procedural text encoder (same token states as
``prior=procedural``) through cross-attention, and takes the camera twice: like MVDream, the flattened
4x4 camera-to-world matrix through an MLP added to the time embedding (diffusers'
``class_embed_type="projection"``, together with a global text code, :func:`text_code`; that
embedding scales and shifts every ResNet block's features), and per pixel, as Plücker ray
coordinates and the rays' points nearest the origin concatenated to the noisy image
(:func:`camera_channels`, :func:`unet_prediction`).
The unconditional branch is the empty prompt at the same camera.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from asd3d.cameras import plucker_rays, ray_points_nearest_origin
from asd3d.prior.base import Prior, to_pixel_space
from asd3d.prior.schedule import gather_abar
from asd3d.prior.stable_diffusion import resolve_dtype, resolve_pretrained
from asd3d.types import Cameras, Condition, ConditionPair, PromptBatch, TextEmbedding
from asd3d.world.text_encoder import ProceduralTextEncoder

METADATA_FILE = "miniature.json"
# Written into miniature.json and checked on load: weights trained with another class-label
# layout would load silently and give garbage predictions.
CLASS_LABELS = (
    "[row-major flattened OpenGL camera-to-world matrix (asd3d.types.Cameras.flat_matrix), "
    "end token state (the pooled text vector)] -> MLP added to the time embedding"
)
# The UNet's input channels: the noisy RGB image, then the camera's per-pixel Plücker rays.
INPUT_CHANNELS = (
    "[noisy RGB (3), Plücker ray direction (3), ray moment o x d (3), "
    "ray point nearest the origin (3)]"
)
IMAGE_CHANNELS, RAY_CHANNELS = 3, 9
HOW_TO_PROVIDE = (
    "train one with `python train_prior.py` and set prior.pretrained=<its export_dir> "
    "(the default location is weights/miniature: `python train_prior.py export_dir=weights/miniature`)"
)
_REQUIRED = (
    METADATA_FILE,
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)


def text_code(
    tokens: Float[Tensor, "N L D"], empty_tokens: Float[Tensor, "1 L D"]
) -> Float[Tensor, "N D"]:
    """A global text code: the end token's state, i.e. the encoder's position-bound pooled vector
    (SD's "EOS state"; asd3d/world/text_encoder.py), found as the last position whose state
    differs from the empty prompt's (position 1 for the empty prompt itself).

    The plain mean token state cannot serve: it is dominated by the ~65 padding states every
    prompt shares (the 16 quickstart prompts' means have cosine similarity 0.998 with each other
    and with the empty prompt's), so the network barely tells prompts apart through it; their
    pooled vectors have a mean pairwise cosine similarity of 0.29.
    """
    differs = (tokens - empty_tokens).abs().amax(dim=-1) > 1e-4  # N x L
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(differs)
    end = torch.where(differs, positions, torch.ones_like(positions)).amax(dim=1)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), end]


def unet_class_labels(
    tokens: Float[Tensor, "N L D"],
    empty_tokens: Float[Tensor, "1 L D"],
    camera_codes: Float[Tensor, "N 16"],
) -> Float[Tensor, "N 16+D"]:
    """What the UNet's time embedding is given besides ``t``: the camera (MVDream) and the
    :func:`text_code`, which reaches every ResNet block (cross-attention only runs at the lowest
    resolution)."""
    return torch.cat([camera_codes, text_code(tokens, empty_tokens)], dim=-1)


def camera_channels(
    c2w: Float[Tensor, "N 4 4"], fovy: Float[Tensor, "N"], resolution: int
) -> Float[Tensor, "N 9 r r"]:
    """The per-pixel camera input (:data:`INPUT_CHANNELS` after the image): the Plücker ray
    (:func:`asd3d.cameras.plucker_rays`) and the ray's point nearest the origin
    (:func:`asd3d.cameras.ray_points_nearest_origin`)."""
    rays = plucker_rays(c2w, fovy, resolution)
    return torch.cat([rays, ray_points_nearest_origin(rays)], dim=1)


def unet_prediction(
    unet: torch.nn.Module,
    x_t: Float[Tensor, "N 3 r r"],
    t: Int[Tensor, "N"],
    tokens: Float[Tensor, "N L D"],
    empty_tokens: Float[Tensor, "1 L D"],
    c2w: Float[Tensor, "N 4 4"],
    fovy: Float[Tensor, "N"],
) -> Float[Tensor, "N 3 r r"]:
    """The miniature UNet's raw output (epsilon or v) for noisy images seen from ``c2w``/``fovy``.

    The camera enters twice. MVDream's global code (flattened ``c2w`` in the time embedding,
    :func:`unet_class_labels`) alone was not used by a 4,000-step run: its denoising loss with the
    cameras shuffled across the batch equalled the loss with the right ones to 0.1%, and its
    samples were the same blob from every view. The per-pixel :func:`camera_channels` tell each
    convolution where the scene's centre projects and which side of the scene its ray passes
    (docs/miniature-prior.md: Plücker rays alone fixed the sizes, not the arrangement).
    """
    dtype = next(unet.parameters()).dtype
    rays = camera_channels(c2w.float(), fovy.float(), x_t.shape[-1])
    labels = unet_class_labels(tokens.float(), empty_tokens.float(), c2w.reshape(-1, 16).float())
    return unet(
        torch.cat([x_t.to(rays.dtype), rays], dim=1).to(dtype),
        t,
        encoder_hidden_states=tokens.to(dtype),
        class_labels=labels.to(dtype),
    ).sample


def read_metadata(root: Path, pretrained: str) -> dict:
    """Check ``root`` holds a miniature prior (before reading any weight); return its metadata."""
    for name in _REQUIRED:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"prior.pretrained={pretrained!r}: missing {root / name}; {HOW_TO_PROVIDE}"
            )
    try:
        return json.loads((root / METADATA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"prior.pretrained={pretrained!r}: malformed {root / METADATA_FILE} ({err})"
        ) from None


class MiniaturePrior(Prior):
    """A frozen miniature prior loaded from the directory ``train_prior.py`` exports.

    Args:
        pretrained: that directory (``unet/``, ``scheduler/``, ``miniature.json``) or a Hub id
            found in the local Hugging Face cache (resolved as for SD).
        text_dim: embedding width the generators are built for; checked against the weights'
            text encoder.
        negative_prompt: text of the unconditional branch (the empty prompt it was trained with).
        dtype: ``fp32`` (default; the model is tiny), ``auto``, ``fp16`` or ``bf16``.
    """

    def __init__(
        self,
        pretrained: str,
        text_dim: int = 1024,
        negative_prompt: str = "",
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.pretrained = str(pretrained)
        self.model_dtype = resolve_dtype(str(dtype))
        root = resolve_pretrained(self.pretrained)
        metadata = read_metadata(root, self.pretrained)
        for key, ours in (("class_labels", CLASS_LABELS), ("input_channels", INPUT_CHANNELS)):
            if metadata.get(key) != ours:
                raise ValueError(
                    f"prior.pretrained={self.pretrained!r}: its {key} are "
                    f"{metadata.get(key)!r}, this code feeds {ours!r}; "
                    "retrain it with `python train_prior.py`"
                )
        encoder_settings = metadata["text_encoder"]
        if int(encoder_settings["dim"]) != int(text_dim):
            raise ValueError(
                f"prior.text_dim={text_dim} differs from the weights' text encoder dim "
                f"{encoder_settings['dim']} ({root / METADATA_FILE}); set "
                f"prior.text_dim={encoder_settings['dim']}"
            )
        self.text_encoder = ProceduralTextEncoder(**encoder_settings)
        self.text_dim = int(text_dim)
        self.resolution = int(metadata["resolution"])
        self.negative_prompt = negative_prompt
        try:
            self.unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", torch_dtype=self.model_dtype
            )
            scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
        except Exception as err:  # corrupt / mismatched weights: one line, the cause chained
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: cannot load {root} "
                f"({type(err).__name__}: {message[:200]}); {HOW_TO_PROVIDE}"
            ) from err
        expected = 16 + self.text_dim
        if self.unet.config.in_channels != IMAGE_CHANNELS + RAY_CHANNELS:
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: the UNet takes "
                f"{self.unet.config.in_channels} input channels, expected "
                f"{IMAGE_CHANNELS + RAY_CHANNELS} {INPUT_CHANNELS}"
            )
        if self.unet.config.projection_class_embeddings_input_dim != expected:
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: the UNet takes "
                f"{self.unet.config.projection_class_embeddings_input_dim}-d class labels, "
                f"expected {expected} (16-d camera + {self.text_dim}-d text code)"
            )
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: prediction_type "
                f"{self.prediction_type!r}, expected 'epsilon' or 'v_prediction'"
            )
        self.register_buffer(
            "empty_tokens", self.text_encoder.encode([""]).tokens.float(), persistent=False
        )
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.float().clone(), persistent=False
        )
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # ----------------------------------------------------------------------------- interface
    def encode_text(self, texts: list[str]) -> TextEmbedding:
        """The procedural text encoder's ``P x L x D`` token states and ``P x D`` pooled vectors."""
        embedding = self.text_encoder.encode(list(texts))
        return TextEmbedding(
            tokens=embedding.tokens.to(self.device), pooled=embedding.pooled.to(self.device)
        )

    def condition(self, prompts: PromptBatch, cameras: Cameras) -> ConditionPair:
        """Per view: the prompt's tokens (positive) or the negative prompt's, same camera."""
        views = cameras.views_per_prompt
        texts = tuple(text for text in prompts.texts for _ in range(views))
        if len(texts) != len(cameras):
            raise ValueError(f"{len(prompts)} prompts x {views} views != {len(cameras)} cameras")
        device = cameras.c2w.device
        positive = self.encode_text(list(prompts.texts)).tokens.to(device)
        positive = positive.repeat_interleave(views, dim=0)
        negative = self.encode_text([self.negative_prompt]).tokens.to(device)
        negative = negative.expand(len(texts), -1, -1)
        flags = torch.zeros(len(texts), dtype=torch.bool, device=device)
        return ConditionPair(
            positive=Condition(texts, flags, cameras, tokens=positive),
            negative=Condition(texts, ~flags, cameras, tokens=negative),
        )

    def encode_images(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B 3 r r"]:
        """Renders in ``[0, 1]`` -> ``2 rgb - 1`` at the prior's resolution (antialiased resize
        when the render size differs); differentiable."""
        return to_pixel_space(rgb, self.resolution)

    @torch.no_grad()
    def predict_eps(
        self, x_t: Float[Tensor, "N 3 r r"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 3 r r"]:
        """One UNet call on all rows (mixed timesteps, prompts and cameras)."""
        return self.predict_eps_with_grad(x_t, t, condition)

    def predict_eps_with_grad(
        self, x_t: Float[Tensor, "N 3 r r"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 3 r r"]:
        """:meth:`predict_eps` with autograd on, for trainable layers injected into the UNet
        (VSD's LoRA, :mod:`asd3d.prior.lora`); the frozen weights get no gradient."""
        if condition.tokens is None:
            raise ValueError("MiniaturePrior.predict_eps needs condition.tokens")
        cameras = condition.cameras.to(self.device)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            out = unet_prediction(
                self.unet,
                x_t.to(self.device),
                t.to(self.device),
                condition.tokens.to(self.device),
                cast(Tensor, self.empty_tokens),
                cameras.c2w,
                cameras.fovy,
            )
        out = out.float().contiguous()
        if self.prediction_type == "v_prediction":
            # eps = sqrt(abar) v + sqrt(1 - abar) x_t (REFERENCE.md §2), as for SD 2.1.
            abar = gather_abar(self.alphas_cumprod, t.to(self.device))
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * x_t.to(self.device).float()
        return out
