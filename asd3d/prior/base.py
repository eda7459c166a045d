"""The interface every prior implements.

A prior is frozen and holds no loss logic and no hidden randomness: the distiller supplies noise
and timesteps, and one ``predict_eps`` call may mix timesteps and conditions row by row.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from asd3d.types import Cameras, Condition, ConditionPair, PromptBatch, TextEmbedding


class Prior(nn.Module, abc.ABC):
    """A frozen 2D diffusion model seen through the four calls score distillation needs.

    Subclasses register ``alphas_cumprod`` (``T``) as a buffer.
    """

    alphas_cumprod: Float[Tensor, "T"]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @abc.abstractmethod
    def encode_text(self, texts: list[str]) -> TextEmbedding:
        """Token states ``P x L x D`` and pooled vector ``P x D`` of each text."""

    @abc.abstractmethod
    def condition(self, prompts: PromptBatch, cameras: Cameras) -> ConditionPair:
        """Per-view positive and negative conditions for ``B = P * V`` rendered views."""

    @abc.abstractmethod
    def encode_images(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B C h w"]:
        """Map renders in ``[0, 1]`` to the space the diffusion model works in (differentiably)."""

    @abc.abstractmethod
    def predict_eps(
        self, x_t: Float[Tensor, "N C h w"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N C h w"]:
        """The model's noise prediction ``eps_hat(x_t, t, c)`` per row."""

    def compile_denoiser(self) -> None:
        """``torch.compile`` the network :meth:`predict_eps` runs, in place (``system.compile``).

        Priors without a network worth compiling keep this default: nothing to do.
        """

    def freeze(self) -> Prior:
        """Detach every parameter from autograd and switch to eval mode."""
        self.requires_grad_(False)
        self.eval()
        return self


def to_pixel_space(rgb: Float[Tensor, "B 3 H W"], resolution: int) -> Float[Tensor, "B 3 r r"]:
    """Renders in ``[0, 1]`` -> ``2 rgb - 1`` at ``resolution`` (antialiased bilinear resize when
    the size differs); differentiable. The input of pixel-space priors (no VAE)."""
    if rgb.shape[-2:] != (resolution, resolution):
        rgb = F.interpolate(
            rgb, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return rgb * 2.0 - 1.0
