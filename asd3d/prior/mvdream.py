"""MVDream (``sd-v2.1-base-4view``) as a frozen score-distillation prior (REFERENCE.md §2).

MVDream is Stable Diffusion 2.1-base with a multi-view UNet (:mod:`asd3d.prior.mvdream_unet`):
the views of one prompt are denoised together (self-attention spans the group) and every view
gets its camera. Everything else is SD 2.1-base's, so this prior is a
:class:`~asd3d.prior.stable_diffusion.StableDiffusionPrior` whose UNet is swapped:

* VAE, OpenCLIP text tower (penultimate layer, as the release's ``FrozenOpenCLIPEmbedder``),
  tokenizer and DDPM schedule come from an SD 2.1-base diffusers directory or Hub id
  (``pretrained``), as in ScaleDreamer's release, whose prompt processor reads SD 2.1-base. The
  UNet comes from the official single-file checkpoint (``checkpoint``; its keys under
  ``model.diffusion_model.``). The file's own ``first_stage_model.`` / ``cond_stage_model.``
  weights are not read (MVDream fine-tunes SD 2.1-base's UNet; its VAE and text tower are taken
  to be SD 2.1-base's); loading VAE and text encoder from the single file is not supported.
* Schedule: the release's config says ``linear`` betas 0.00085 -> 0.012, but the LDM code's
  ``make_beta_schedule("linear")`` is linear in ``sqrt(beta)``, i.e. diffusers' ``scaled_linear``
  (SD's); the scheduler of ``pretrained`` is checked against it. Prediction: epsilon.
* Renders are resized to 256² (32² latents); text conditioning is shared per prompt
  (no view-dependent suffixes by default: the model gets the camera instead).

Camera convention (checked in ``tests/prior/test_mvdream_prior.py``): the camera input is the
camera-to-world matrix with its translation scaled to unit length, flattened row-major (16-d),
taken in the frame ScaleDreamer / threestudio feed it, which is ours: OpenGL camera axes, world
``+z`` up (the release's ``convert_opengl_to_blender`` is already applied there). In the terms of
the official ``mvdream.camera_utils.get_camera`` (y-up look-at, then ``flip_yz``), our camera at
azimuth ``a`` equals theirs at azimuth ``a + 90°``, same elevation.

One :meth:`predict_eps` call is ONE UNet call with ``num_frames = num_views``: the rows are cut
into consecutive groups of ``num_views``, and each group must be the views of one prompt in one
branch. Every distiller query is ``P x V`` rows (prompt-major), so concatenated queries stay
aligned; a batch that is not is refused. ``camera_condition=false`` reproduces the release
without camera (``camera=None``, which also means ``num_frames=1``: every image on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from asd3d.prior.mvdream_unet import (
    MVDREAM_SD21_BASE_4VIEW_CONFIG,
    MultiViewUNet,
    load_official_state_dict,
)
from asd3d.prior.schedule import ddpm_alphas_cumprod
from asd3d.prior.stable_diffusion import StableDiffusionPrior
from asd3d.types import Cameras, Condition, ConditionPair, PromptBatch

MVDREAM_REPO = "MVDream/MVDream"
MVDREAM_FILENAME = "sd-v2.1-base-4view.pt"
HOW_TO_PROVIDE_CHECKPOINT = (
    f"download it with `hf download {MVDREAM_REPO} {MVDREAM_FILENAME}` "
    f"or set prior.checkpoint=/path/to/{MVDREAM_FILENAME} (.pt or .safetensors)"
)
# The release's schedule (configs/sd-v2-base.yaml: timesteps, linear_start, linear_end; its
# LDM "linear" is diffusers' "scaled_linear").
MVDREAM_SCHEDULE = (1000, 0.00085, 0.012, "scaled_linear")


def _hub_offline() -> bool:
    # Read the variable at call time too: huggingface_hub parses it once, at import.
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return constants.is_offline_mode() or flag


def resolve_checkpoint(checkpoint: str, filename: str, revision: str | None = None) -> Path:
    """The local file of the MVDream checkpoint: a file, a directory holding ``filename``, or a
    Hub repo id whose ``filename`` is in the Hugging Face cache (downloaded unless offline).

    Raises a one-line ``FileNotFoundError`` naming what was tried and how to provide it.
    """
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(
            f"prior.checkpoint={checkpoint!r}: no {filename} in {path} "
            f"(prior.checkpoint_file); {HOW_TO_PROVIDE_CHECKPOINT}"
        )
    hub_id = checkpoint.count("/") == 1 and not checkpoint.startswith((".", "/", "~"))
    if not hub_id or path.suffix in {".pt", ".ckpt", ".safetensors", ".pth"}:
        raise FileNotFoundError(
            f"prior.checkpoint={checkpoint!r}: no file at {path}; {HOW_TO_PROVIDE_CHECKPOINT}"
        )
    from huggingface_hub import constants, hf_hub_download

    offline = _hub_offline()
    try:
        return Path(
            hf_hub_download(checkpoint, filename, revision=revision, local_files_only=offline)
        )
    except Exception as err:  # not cached / no network / bad id: one actionable line
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE}" + (
            " (HF_HUB_OFFLINE=1)" if offline else ""
        )
        raise FileNotFoundError(
            f"prior.checkpoint={checkpoint!r} file {filename!r} (revision {revision or 'main'}) "
            f"is not in {where}: {type(err).__name__}; {HOW_TO_PROVIDE_CHECKPOINT}"
        ) from None


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """The tensors of a ``.safetensors`` file or of a ``torch.save``d dict, read without running
    code (``weights_only=True``; memory-mapped where the file format allows)."""
    state: object
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format: cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # Lightning / LDM training checkpoints wrap it
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state


def camera_codes(cameras: Cameras) -> Float[Tensor, "B 16"]:
    """MVDream's camera input: c2w with the translation scaled to unit length, row-major.

    As the release's ``normalize_camera`` (epsilon 1e-8 included), applied to our OpenGL /
    ``+z``-up c2w, the frame ScaleDreamer's cameras are in (see the module docstring).
    """
    c2w = cameras.c2w.float().clone()
    translation = c2w[:, :3, 3]
    c2w[:, :3, 3] = translation / (translation.norm(dim=-1, keepdim=True) + 1e-8)
    return dataclasses.replace(cameras, c2w=c2w).flat_matrix()


def check_view_groups(condition: Condition, num_frames: int) -> None:
    """Refuse a batch whose consecutive ``num_frames``-row groups are not each the views of one
    prompt in one branch (the UNet would attend across unrelated images without an error)."""
    n = len(condition)
    if n % num_frames:
        raise ValueError(
            f"MVDream prior: {n} rows are not whole groups of num_frames={num_frames} "
            f"consecutive views; every distiller query must hold P x {num_frames} rows"
        )
    branch = condition.unconditional.reshape(-1, num_frames)
    mixed = branch.any(dim=1) != branch.all(dim=1)
    if mixed.device.type != "cpu":
        # Checked on the device, asynchronously: reading the flags back would stall every UNet
        # call. A mixed group (no distiller builds one) stops the run with a device assert.
        torch._assert_async(~mixed.any(), "MVDream prior: a view group mixes branches")
        mixed = torch.zeros(len(branch), dtype=torch.bool)
    for group, mixed_branch in enumerate(mixed.tolist()):  # host texts (and host flags)
        start = group * num_frames
        texts = sorted(set(condition.texts[start : start + num_frames]))
        if mixed_branch or len(texts) > 1:
            raise ValueError(
                f"MVDream prior: rows {start}..{start + num_frames - 1} are not the "
                f"{num_frames} views of one prompt in one branch (texts {texts[:2]}); views "
                f"must be consecutive and prompt-major, each group starting at a multiple of "
                f"{num_frames}"
            )


class MVDreamPrior(StableDiffusionPrior):
    """MVDream's 4-view SD 2.1-base as a frozen prior (see the module docstring).

    Args:
        pretrained: SD 2.1-base in the diffusers layout (Hub id in the HF cache or a local
            directory) for VAE, text encoder, tokenizer and scheduler; its ``unet/`` is not read.
        checkpoint: the MVDream single-file checkpoint: a ``.pt`` / ``.safetensors`` file, a
            directory holding ``checkpoint_file``, or a Hub repo id (``MVDream/MVDream``).
        checkpoint_file: the file inside a directory / Hub repo (``sd-v2.1-base-4view.pt``).
        revision: Hub revision of ``pretrained`` and of a Hub ``checkpoint``.
        unet: the ``MultiViewUNet`` config (keys of the release's ``unet_config.params``);
            ``None`` is the release's ``sd-v2-base.yaml`` one.
        num_views: views per prompt denoised together (``num_frames``; the release: 4). Must
            equal the cameras' ``views_per_prompt``.
        camera_condition: feed the camera codes; ``false`` runs the release's camera-less path
            (``camera=None``, ``num_frames=1``).
        text_dim, resolution, negative_prompt, view_dependent_prompting, dtype, enable_sdpa,
        channels_last, text_cache_size, text_embeddings, accelerator: as for :class:`StableDiffusionPrior`
            (no Perp-Neg: MVDream gets the camera); ``enable_sdpa`` false runs the UNet's
            attention on PyTorch's math backend.
    """

    diffusers_subfolders = ("vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(
        self,
        pretrained: str,
        checkpoint: str,
        checkpoint_file: str = MVDREAM_FILENAME,
        revision: str | None = None,
        unet: Mapping | None = None,
        num_views: int = 4,
        camera_condition: bool = True,
        text_dim: int = 1024,
        resolution: int = 256,
        negative_prompt: str = "",
        view_dependent_prompting: bool = False,
        dtype: str = "auto",
        enable_sdpa: bool = True,
        channels_last: bool = False,
        text_cache_size: int = 4096,
        text_embeddings: str | None = None,
        accelerator: str = "auto",
    ) -> None:
        if int(num_views) != num_views or num_views < 1:
            raise ValueError(f"prior.num_views={num_views} must be a positive integer")
        unet_config = dict(MVDREAM_SD21_BASE_4VIEW_CONFIG if unet is None else unet)
        if unet_config.get("context_dim") != text_dim:
            raise ValueError(
                f"prior.unet.context_dim={unet_config.get('context_dim')} must equal "
                f"prior.text_dim={text_dim} (the text encoder's width)"
            )
        if camera_condition and unet_config.get("camera_dim") != 16:
            raise ValueError(
                f"prior.camera_condition=true needs prior.unet.camera_dim=16 (a flattened 4x4 "
                f"c2w), got {unet_config.get('camera_dim')}"
            )
        # Resolved before the parent loads anything, so a missing file fails in milliseconds.
        # Plain attributes may be set before nn.Module.__init__; _load_unet reads them.
        self.checkpoint = str(checkpoint)
        self.checkpoint_path = resolve_checkpoint(self.checkpoint, checkpoint_file, revision)
        self.unet_config = unet_config
        self.num_views = int(num_views)
        self.camera_condition = bool(camera_condition)
        self.enable_sdpa = bool(enable_sdpa)
        super().__init__(
            pretrained=pretrained,
            revision=revision,
            text_dim=text_dim,
            resolution=resolution,
            negative_prompt=negative_prompt,
            view_dependent_prompting=view_dependent_prompting,
            dtype=dtype,
            enable_sdpa=enable_sdpa,
            channels_last=channels_last,
            text_cache_size=text_cache_size,
            text_embeddings=text_embeddings,
            accelerator=accelerator,
        )
        self.prediction_type = "epsilon"  # the release's parameterization, whatever SD's says
        expected = ddpm_alphas_cumprod(*MVDREAM_SCHEDULE)
        if self.alphas_cumprod.shape != expected.shape or not torch.allclose(
            self.alphas_cumprod, expected, rtol=1e-4, atol=1e-6
        ):
            raise ValueError(
                f"prior.pretrained={self.pretrained!r}: its scheduler is not MVDream's training "
                f"schedule (1000 steps, scaled-linear betas 0.00085 -> 0.012); use SD 2.1-base"
            )

    # ----------------------------------------------------------------------------- loading
    def _load_unet(self, root: Path, enable_sdpa: bool) -> nn.Module:
        """``MultiViewUNet`` from the official checkpoint, built on ``meta`` and assigned the
        file's tensors (no random init, one copy of the weights), cast to the model dtype."""
        where = f"prior.checkpoint={self.checkpoint!r} ({self.checkpoint_path})"
        try:
            state = read_state_dict(self.checkpoint_path)
        except Exception as err:  # corrupt / not a tensor file: one line, the cause chained
            message = " ".join(str(err).split())[:200]
            raise ValueError(
                f"{where}: cannot read it ({type(err).__name__}: {message}); "
                f"{HOW_TO_PROVIDE_CHECKPOINT}"
            ) from err
        try:
            with torch.device("meta"):
                unet = MultiViewUNet(**self.unet_config)
            load_official_state_dict(unet, state, assign=True)
        except (ValueError, RuntimeError, TypeError) as err:
            message = " ".join(str(err).split())[:300]
            raise ValueError(
                f"{where} does not match prior.unet ({message}); {HOW_TO_PROVIDE_CHECKPOINT}"
            ) from err
        return unet.to(self.model_dtype)

    # ----------------------------------------------------------------------------- conditions
    def condition(self, prompts: PromptBatch, cameras: Cameras) -> ConditionPair:
        """As SD's (per-view rows, the negative prompt on the unconditional branch), after
        checking the cameras come in groups of ``num_views`` per prompt."""
        if cameras.views_per_prompt != self.num_views:
            raise ValueError(
                f"prior.num_views={self.num_views} but the cameras give "
                f"{cameras.views_per_prompt} view(s) per prompt; use cameras=mvdream (or set "
                f"cameras.views_per_prompt={self.num_views})"
            )
        return super().condition(prompts, cameras)

    # ----------------------------------------------------------------------------- denoiser
    @torch.no_grad()
    def predict_eps(
        self, x_t: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 4 h w"]:
        """ONE ``MultiViewUNet`` call on all rows (mixed timesteps and branches), groups of
        ``num_views`` consecutive rows attending to each other, each row with its camera."""
        return self.predict_eps_with_grad(x_t, t, condition)

    def predict_eps_with_grad(
        self, x_t: Float[Tensor, "N 4 h w"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 4 h w"]:
        """:meth:`predict_eps` with autograd on (trainable layers injected into the UNet, VSD's
        LoRA); the frozen weights get no gradient."""
        if condition.tokens is None:
            raise ValueError("MVDreamPrior.predict_eps needs condition.tokens")
        if self.camera_condition:
            num_frames = self.num_views
            check_view_groups(condition, num_frames)
            camera = camera_codes(condition.cameras).to(self.device, self.model_dtype)
        else:
            num_frames, camera = 1, None  # the release's camera-less call: images on their own
        with self._autocast_off(x_t.device), self._attention_backend():
            out = self.unet(
                self._to_model(x_t),
                t.to(self.device),
                context=condition.tokens.to(self.device, self.model_dtype),
                camera=camera,
                num_frames=num_frames,
            )
        return out.float().contiguous()

    def _attention_backend(self):
        if self.enable_sdpa:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
