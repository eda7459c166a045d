"""Stable Diffusion 2.1 (-base) as a frozen score-distillation prior, through diffusers
(REFERENCE.md §2).

Renders go through SD's VAE encoder (bilinear resize to ``resolution``, ``2x - 1``, posterior
sample times the VAE's scaling factor 0.18215, gradient through the encoder) into 4-channel
latents; the UNet predicts the noise of ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``
(REFERENCE.md §1). SD 2.1 (768) predicts ``v = sqrt(abar) eps - sqrt(1 - abar) z`` instead; it is
turned back into ``eps = sqrt(abar) v + sqrt(1 - abar) x_t`` (REFERENCE.md §2) so every distiller
sees noise predictions.

Text conditioning is what diffusers' ``StableDiffusionPipeline`` feeds the UNet: the text
encoder's ``last_hidden_state`` (after its final LayerNorm). For SD 2.x the converted text encoder
already stops at OpenCLIP ViT-H's penultimate block, so this is SD 2's "penultimate layer"
conditioning. The pooled vector the generators take is the EOS token's state of the same hidden
states, with no projection (REFERENCE.md §3).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from asd3d.prior.base import Prior
from asd3d.prior.embedding_cache import TextEmbeddingFile
from asd3d.prior.schedule import gather_abar
from asd3d.prior.view_prompts import (
    SUFFIXES,
    PerpNegWeights,
    perp_neg_views,
    view_dependent_texts,
)
from asd3d.transfer import to_device
from asd3d.types import (
    Cameras,
    Condition,
    ConditionPair,
    PerpNegConditions,
    PromptBatch,
    TextEmbedding,
)

HOW_TO_PROVIDE = (
    "download it with `hf download stabilityai/stable-diffusion-2-1-base` "
    "or set prior.pretrained=/path/to/diffusers/dir"
)
# What each subfolder of a diffusers SD directory must hold: (config, any one of the weights).
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)
_LAYOUT: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "unet": ("config.json", _DIFFUSERS_WEIGHTS),
    "vae": ("config.json", _DIFFUSERS_WEIGHTS),
    "text_encoder": (
        "config.json",
        ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"),
    ),
    "tokenizer": (None, ("tokenizer.json", "vocab.json")),
    "scheduler": ("scheduler_config.json", ()),
}
# Hub files the prior needs (the SD repos also hold multi-GB LDM checkpoints and fp16 variants).
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "*/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def resolve_dtype(dtype: str, accelerator: str = "auto") -> torch.dtype:
    """``auto``: fp16 when the run goes to CUDA (``accelerator`` ``auto``/``gpu``/``cuda`` and a
    GPU is visible), fp32 otherwise: a CPU run (``trainer.accelerator=cpu``) on a machine with a
    GPU keeps fp32, whose CPU kernels are the fast and complete ones."""
    if dtype == "auto":
        on_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.float16 if on_cuda else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"prior.dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only be a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_pretrained(pretrained: str, revision: str | None = None) -> Path:
    """The local diffusers directory for ``pretrained`` (a directory or a Hub id).

    Hub ids are looked up in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``); with
    ``HF_HUB_OFFLINE=1`` nothing is downloaded, otherwise only the files the prior needs are.
    Raises a one-line ``FileNotFoundError`` naming what was tried and how to provide it.
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists() or _looks_like_path(pretrained):
        raise FileNotFoundError(
            f"prior.pretrained={pretrained!r}: no diffusers directory at {path}; {HOW_TO_PROVIDE}"
        )
    from huggingface_hub import constants, snapshot_download

    # Read the variable now too: huggingface_hub parses it once, at import.
    offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }
    try:
        snapshot = snapshot_download(
            pretrained,
            revision=revision,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
        )
    except Exception as err:  # not cached / no network / bad id: one actionable line
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE}" + (
            " (HF_HUB_OFFLINE=1)" if offline else ""
        )
        raise FileNotFoundError(
            f"prior.pretrained={pretrained!r} (revision {revision or 'main'}) is not in {where}: "
            f"{type(err).__name__}; {HOW_TO_PROVIDE}"
        ) from None
    return Path(snapshot)


def check_layout(
    root: Path, pretrained: str, subfolders: Collection[str] = tuple(_LAYOUT)
) -> dict[str, dict]:
    """Check ``root`` holds the SD components ``subfolders`` (default: all); return the parsed
    configs by subfolder.

    Runs before any weight is read, so a wrong directory fails in milliseconds with one line.
    """
    configs: dict[str, dict] = {}
    for subfolder, (config_name, weight_names) in _LAYOUT.items():
        if subfolder not in subfolders:
            continue
        folder = root / subfolder
        if config_name is not None:
            config_path = folder / config_name
            if not config_path.is_file():
                raise FileNotFoundError(
                    f"prior.pretrained={pretrained!r}: missing {config_path} (subfolder "
                    f"{subfolder!r}); {HOW_TO_PROVIDE}"
                )
            try:
                configs[subfolder] = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"prior.pretrained={pretrained!r}: malformed {config_path} ({err}); "
                    f"{HOW_TO_PROVIDE}"
                ) from None
        if weight_names and not any((folder / name).is_file() for name in weight_names):
            raise FileNotFoundError(
                f"prior.pretrained={pretrained!r}: no {' / '.join(weight_names)} in {folder} "
                f"(subfolder {subfolder!r}); {HOW_TO_PROVIDE}"
            )
    return configs


class StableDiffusionPrior(Prior):
    """SD 2.1-base (512, epsilon) or SD 2.1 (768, v-prediction) as a frozen prior.

    The prediction type comes from the scheduler config of the weights. Every weight is frozen;
    the system keeps the prior outside its module tree, so none of it reaches a checkpoint.

    Args:
        pretrained: a Hub id (``stabilityai/stable-diffusion-2-1-base``) found in the local HF
            cache, or a local diffusers directory (``unet/ vae/ text_encoder/ tokenizer/
            scheduler/``).
        revision: Hub revision (branch, tag or commit) of a Hub id; ignored for directories.
        text_dim: expected width of the text encoder (1024 for SD 2.x); checked against it.
        resolution: side the renders are resized to before the VAE (512 / 768).
        negative_prompt: text of the unconditional branch ("" for SD, REFERENCE.md §1).
        view_dependent_prompting: append ", front/side/back/overhead view" per camera.
        dtype: ``auto`` (fp16 when the run is on CUDA, else fp32: :func:`resolve_dtype`),
            ``fp32``, ``fp16`` or ``bf16``; the UNet and text encoder run in it, inputs are cast,
            outputs are float32. The VAE encoder, which the distillation gradient flows back
            through, runs in bf16 when this is fp16: fp16's 5-bit exponent flushes small
            gradients to zero without loss scaling, bf16 has fp32's range (docs/performance.md).
        accelerator: the trainer's accelerator (``trainer.accelerator``), read by ``auto``.
        enable_sdpa: attention through PyTorch's ``scaled_dot_product_attention`` (diffusers'
            ``AttnProcessor2_0``: flash / memory-efficient kernels where available); ``false``
            uses diffusers' plain ``AttnProcessor`` (explicit softmax, more memory).
        channels_last: run the UNet and VAE in channels-last memory format (faster on GPUs with
            tensor cores).
        text_cache_size: text embeddings kept in an LRU cache on the prior's device (fp16;
            ~158 KB per entry at 77 x 1024), so memory stays bounded whatever the corpus size;
            0 disables it. Sized to hold a corpus' texts and their view variants; corpora
            beyond it read ``text_embeddings`` (docs/text-embeddings.md).
        perp_neg: Perp-Neg (needs view-dependent prompting): interpolated view prompts plus two
            weighted view negatives per render (:mod:`asd3d.prior.view_prompts`); distillers then
            query 4 blocks of rows at ``t`` instead of 2.
        perp_neg_weights: the release's weight curves and scale (:class:`PerpNegWeights`).
        text_embeddings: a directory written by ``python -m asd3d.embed_prompts`` for these
            weights; texts found there are read from disk (fp16), others are encoded on demand.
    """

    # The subfolders of the diffusers directory this prior reads (MVDream brings its own UNet).
    diffusers_subfolders: tuple[str, ...] = tuple(_LAYOUT)

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        text_dim: int = 1024,
        resolution: int = 512,
        negative_prompt: str = "",
        view_dependent_prompting: bool = True,
        dtype: str = "auto",
        enable_sdpa: bool = True,
        channels_last: bool = False,
        text_cache_size: int = 4096,
        perp_neg: bool = False,
        perp_neg_weights: PerpNegWeights | None = None,
        text_embeddings: str | None = None,
        accelerator: str = "auto",
    ) -> None:
        super().__init__()
        if perp_neg and not view_dependent_prompting:
            raise ValueError(
                "prior.perp_neg=true needs prior.view_dependent_prompting=true (its negatives are "
                "the view prompts); set one of them"
            )
        if resolution <= 0:
            raise ValueError(f"prior.resolution={resolution} must be > 0")
        if text_cache_size < 0:
            raise ValueError(f"prior.text_cache_size={text_cache_size} must be >= 0")
        self.model_dtype = resolve_dtype(str(dtype), str(accelerator))
        self.vae_dtype = torch.bfloat16 if self.model_dtype == torch.float16 else self.model_dtype
        self.pretrained = str(pretrained)
        root = resolve_pretrained(self.pretrained, revision)
        configs = check_layout(root, self.pretrained, self.diffusers_subfolders)
        hidden = configs["text_encoder"].get("hidden_size")
        if hidden != text_dim:
            raise ValueError(
                f"prior.text_dim={text_dim} differs from the text encoder's hidden size {hidden} "
                f"({root / 'text_encoder' / 'config.json'}); set prior.text_dim={hidden}"
            )
        prediction_type = configs["scheduler"].get("prediction_type", "epsilon")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: scheduler prediction_type "
                f"{prediction_type!r} is not one of {', '.join(_PREDICTION_TYPES)}"
            )
        self.text_dim = text_dim
        self.resolution = int(resolution)
        self.negative_prompt = negative_prompt
        self.view_dependent_prompting = bool(view_dependent_prompting)
        self.channels_last = bool(channels_last)
        self.prediction_type = prediction_type
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.perp_neg = bool(perp_neg)
        self.perp_neg_weights = perp_neg_weights or PerpNegWeights()
        # Precomputed embeddings (python -m asd3d.embed_prompts), checked before any weight loads.
        self.embedding_file = (
            TextEmbeddingFile(text_embeddings, model=self.pretrained, text_dim=text_dim)
            if text_embeddings
            else None
        )

        self._load(root, enable_sdpa)
        self.freeze()

    # ----------------------------------------------------------------------------- loading
    def _load_component(self, root: Path, subfolder: str, loader: Callable[[], object]):
        """``loader()``, with a failure turned into one line naming the subfolder and the fix."""
        try:
            return loader()
        except Exception as err:  # corrupt / mismatched weights: one line, the cause chained
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: cannot load {root / subfolder} "
                f"({type(err).__name__}: {message[:200]}); {HOW_TO_PROVIDE}"
            ) from err

    def _load(self, root: Path, enable_sdpa: bool) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
        from transformers import CLIPTextModel, CLIPTokenizer

        def load(subfolder: str, loader):
            return self._load_component(root, subfolder, loader)

        dtype = self.model_dtype
        self.unet = self._load_unet(root, enable_sdpa)
        self.vae = load(
            "vae",
            lambda: AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=self.vae_dtype
            ),
        )
        self.text_encoder = load(
            "text_encoder",
            lambda: CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
        )
        # from_pretrained, never vocab_file=: transformers 5 builds a 2-token tokenizer from it.
        self.tokenizer = load(
            "tokenizer", lambda: CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        )
        scheduler = load(
            "scheduler", lambda: DDPMScheduler.from_pretrained(root, subfolder="scheduler")
        )
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.float().clone(), persistent=False
        )
        self.vae.set_attn_processor(AttnProcessor2_0() if enable_sdpa else AttnProcessor())
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    def _load_unet(self, root: Path, enable_sdpa: bool) -> nn.Module:
        """The denoiser, in ``self.model_dtype``: SD's diffusers UNet from ``root / "unet"``.

        The hook a prior with its own network overrides (:class:`asd3d.prior.mvdream.MVDreamPrior`).
        """
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        unet = self._load_component(
            root,
            "unet",
            lambda: UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", torch_dtype=self.model_dtype
            ),
        )
        unet.set_attn_processor(AttnProcessor2_0() if enable_sdpa else AttnProcessor())
        return unet

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def _autocast_off(self, device: torch.device):
        # The prior runs in its own dtype whatever the trainer's mixed precision says.
        return torch.autocast(device_type=device.type, enabled=False)

    def compile_denoiser(self) -> None:
        self.unet.compile()

    def _to_model(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        x = x.to(device=self.device, dtype=dtype or self.model_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ----------------------------------------------------------------------------- text
    @torch.no_grad()
    def _encode_uncached(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states and EOS states of ``texts``, as diffusers' pipeline conditions the UNet."""
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with self._autocast_off(self.device):
            hidden = self.text_encoder(ids)[0]  # last_hidden_state, after the final LayerNorm
        # First EOS of each row (SD 2.x pads with "!", SD 1.x with EOS: the first is the end).
        is_eos = ids == self.tokenizer.eos_token_id
        eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1] - 1)
        pooled = hidden[torch.arange(len(texts), device=ids.device), eos]
        return hidden, pooled

    def encode_text(self, texts: list[str]) -> TextEmbedding:
        """``P x 77 x D`` token states and ``P x D`` EOS states (float32, on the prior's device).

        Embeddings are stored (and returned) at fp16 precision in a bounded LRU cache on the
        prior's device, so a repeated text costs one gather and no host-device copy, and the
        result does not depend on the cache's state.
        """
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        if self._text_cache and next(iter(self._text_cache.values()))[0].device != self.device:
            self._text_cache.clear()  # the prior moved: entries on the old device are dropped
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for text in unique:
            if text in self._text_cache:
                self._text_cache.move_to_end(text)
                found[text] = self._text_cache[text]
        missing = [text for text in unique if text not in found]
        if self.embedding_file is not None and missing:
            rows = self.embedding_file.lookup(missing)
            if rows:  # one copy of all the rows read from the file
                tokens = to_device(torch.stack([rows[t][0] for t in rows]), self.device)
                pooled = to_device(torch.stack([rows[t][1] for t in rows]), self.device)
                found.update((t, (tokens[i], pooled[i])) for i, t in enumerate(rows))
            missing = [text for text in missing if text not in found]
            self.embedding_file.note_missing(missing)
        for start in range(0, len(missing), 64):  # bounded text-encoder batches
            chunk = missing[start : start + 64]
            tokens, pooled = self._encode_uncached(chunk)
            tokens, pooled = tokens.to(torch.float16), pooled.to(torch.float16)
            for i, text in enumerate(chunk):  # clones: an entry must not pin its whole chunk
                found[text] = (tokens[i].clone(), pooled[i].clone())
        if self.text_cache_size:
            for text in unique:
                self._text_cache[text] = found[text]
                self._text_cache.move_to_end(text)
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        with self._autocast_off(self.device):  # fp16 entries: CPU autocast refuses to stack them
            return TextEmbedding(
                tokens=torch.stack([found[t][0] for t in texts]).float(),
                pooled=torch.stack([found[t][1] for t in texts]).float(),
            )

    def condition(self, prompts: PromptBatch, cameras: Cameras) -> ConditionPair:
        """Per view: the (view-dependent) prompt's tokens, and the negative prompt's tokens; with
        ``perp_neg``, Perp-Neg's interpolated positive and its two weighted view negatives.

        ``texts`` stay the bare prompts (the prompt each row belongs to); the view suffix lives in
        the tokens only.
        """
        views = cameras.views_per_prompt
        texts = tuple(text for text in prompts.texts for _ in range(views))
        if len(texts) != len(cameras):
            raise ValueError(f"{len(prompts)} prompts x {views} views != {len(cameras)} cameras")
        device = cameras.c2w.device
        negative = self.encode_text([self.negative_prompt]).tokens.to(device)
        negative = negative.expand(len(texts), -1, -1)
        if self.perp_neg:
            return self._perp_neg_condition(prompts, cameras, texts, negative)
        if self.view_dependent_prompting:  # from the host's angles: no device sync
            elevation, azimuth = cameras.angles_on_host()
            positive_texts = view_dependent_texts(prompts.texts, azimuth, elevation)
        else:
            positive_texts = list(texts)
        positive = self.encode_text(positive_texts).tokens.to(device)
        flags = torch.zeros(len(texts), dtype=torch.bool, device=device)
        return ConditionPair(
            positive=Condition(texts, flags, cameras, tokens=positive),
            negative=Condition(texts, ~flags, cameras, tokens=negative),
        )

    def embedding_texts(self, prompt: str) -> list[str]:
        """Every text :meth:`condition` and the generators encode for ``prompt`` (what
        ``python -m asd3d.embed_prompts`` stores): the prompt and its view-dependent variants."""
        if not self.view_dependent_prompting:
            return [prompt]
        return [prompt] + [prompt + suffix for suffix in SUFFIXES.values()]

    def _perp_neg_condition(
        self,
        prompts: PromptBatch,
        cameras: Cameras,
        texts: tuple[str, ...],
        negative: Float[Tensor, "B L D"],
    ) -> ConditionPair:
        """Perp-Neg: interpolated view tokens as the positive, two weighted view negatives
        (:func:`asd3d.prior.view_prompts.perp_neg_views`).

        The per-row choices are made on the host (from the cameras' host angles) and reach the
        device as one ``B x 11`` block: 4 direction columns, 4 negative-prompt flags, the
        mixing ratio and the 2 weights.
        """
        device = cameras.c2w.device
        elevation, azimuth = cameras.angles_on_host()
        views = perp_neg_views(azimuth, elevation, self.perp_neg_weights)
        directions = list(SUFFIXES)
        table = self.encode_text(
            [prompt + SUFFIXES[name] for prompt in prompts.texts for name in directions]
        ).tokens.to(device)
        table = table.view(len(prompts), len(directions), *table.shape[1:])
        prompt_of_row = torch.arange(len(texts), device=device) // cameras.views_per_prompt

        choices: list[list[str | None]] = [  # per row: the 2 mixed directions, the 2 negatives
            [a for a, _ in views.mix],
            [b for _, b in views.mix],
            [pair[0] for pair in views.negatives],
            [pair[1] for pair in views.negatives],
        ]
        columns = [[directions.index(n) if n is not None else 0 for n in c] for c in choices]
        is_negative_prompt = [[float(n is None) for n in c] for c in choices]
        host = torch.cat(
            [
                torch.tensor(columns, dtype=torch.float32).T,
                torch.tensor(is_negative_prompt, dtype=torch.float32).T,
                views.ratio.view(-1, 1),
                views.weights,
            ],
            dim=1,
        )
        block = to_device(host, device)
        column, use_negative = block[:, :4].long(), block[:, 4:8].bool()
        ratio, weights = block[:, 8].view(-1, 1, 1), block[:, 9:11]

        def tokens(k: int) -> Tensor:
            gathered = table[prompt_of_row, column[:, k]]
            return torch.where(use_negative[:, k].view(-1, 1, 1), negative, gathered)

        positive = ratio * tokens(0) + (1.0 - ratio) * tokens(1)
        flags = torch.zeros(len(texts), dtype=torch.bool, device=device)
        negatives = tuple(Condition(texts, flags, cameras, tokens=tokens(2 + k)) for k in range(2))
        return ConditionPair(
            positive=Condition(texts, flags, cameras, tokens=positive),
            negative=Condition(texts, ~flags, cameras, tokens=negative),
            perp_neg=PerpNegConditions(negatives, weights.contiguous()),
        )

    # ----------------------------------------------------------------------------- images
    def encode_images(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B 4 h w"]:
        """Renders in ``[0, 1]`` -> SD latents ``scaling_factor * sample(q(z | 2 rgb - 1))``.

        Differentiable through the (frozen) encoder: the distillation gradient reaches the render.
        """
        if rgb.shape[-2:] != (self.resolution, self.resolution):
            rgb = F.interpolate(
                rgb, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        x = self._to_model(rgb * 2.0 - 1.0, self.vae_dtype)
        with self._autocast_off(x.device):
            posterior = self.vae.encode(x).latent_dist
            latents = posterior.sample(generator) * self.vae.config.scaling_factor
        return latents.float().contiguous()

    # ----------------------------------------------------------------------------- denoiser
    @torch.no_grad()
    def predict_eps(
        self, x_t: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 4 h w"]:
        """One UNet call on all rows (mixed timesteps and conditions), as noise predictions."""
        return self.predict_eps_with_grad(x_t, t, condition)

    def predict_eps_with_grad(
        self, x_t: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 4 h w"]:
        """:meth:`predict_eps` with autograd on, for trainable layers injected into the UNet
        (VSD's LoRA, :mod:`asd3d.prior.lora`); the frozen weights get no gradient."""
        if condition.tokens is None:
            raise ValueError("StableDiffusionPrior.predict_eps needs condition.tokens")
        with self._autocast_off(x_t.device):
            out = self.unet(
                self._to_model(x_t),
                t.to(self.device),
                encoder_hidden_states=condition.tokens.to(self.device, self.model_dtype),
            ).sample
        out = out.float().contiguous()
        if self.prediction_type == "v_prediction":
            # eps = sqrt(abar) v + sqrt(1 - abar) x_t (REFERENCE.md §2).
            abar = gather_abar(self.alphas_cumprod, t.to(self.device))
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * x_t.float()
        return out
