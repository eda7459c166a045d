"""Boundary types shared by every part of asd3d.

Conventions, stated once for the whole package:

* Images are ``B x C x H x W`` float tensors in ``[0, 1]``.
* Cameras are OpenGL-convention camera-to-world matrices (camera looks down its local ``-z``,
  ``+y`` is up, ``+x`` is right); the world is ``+z``-up. Angles are radians.
* A batch of ``P`` prompts rendered from ``V`` views each is flattened prompt-major to
  ``B = P * V``: the views of one prompt are consecutive.
* Dimension names: B batch, V views, P prompts, L tokens, D embedding, N points, R rays,
  S samples per ray, H W image, h w latent, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def _concat_field(values: list):
    first = values[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, tuple):
        return tuple(item for value in values for item in value)
    if hasattr(first, "concat"):
        return type(first).concat(values)
    raise TypeError(f"cannot concatenate field of type {type(first).__name__}")


def _index_field(value, index: Tensor):
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, tuple):
        return tuple(value[i] for i in index.tolist())
    return value.index(index)


@dataclass(frozen=True)
class Cameras:
    """A flat batch of pinhole cameras (``B = P * V``, views of a prompt consecutive).

    ``c2w`` is the OpenGL camera-to-world matrix; ``elevation``/``azimuth``/``distance`` are the
    spherical coordinates of the camera centre around the origin (world ``+z`` up, azimuth 0 on
    ``+x``), kept for view-dependent prompting and logging.
    """

    c2w: Float[Tensor, "B 4 4"]
    fovy: Float[Tensor, "B"]
    elevation: Float[Tensor, "B"]
    azimuth: Float[Tensor, "B"]
    distance: Float[Tensor, "B"]
    views_per_prompt: int = 1
    #: ``(elevation, azimuth)`` on the CPU when the cameras were drawn there and moved to a GPU
    #: (:func:`asd3d.cameras.move_cameras`): view-dependent prompting reads them without a sync.
    host_angles: tuple[Tensor, Tensor] | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def angles_on_host(self) -> tuple[Float[Tensor, "B"], Float[Tensor, "B"]]:
        """``(elevation, azimuth)`` on the CPU (a device copy only when no host copy is kept)."""
        if self.host_angles is not None:
            return self.host_angles
        return self.elevation.cpu(), self.azimuth.cpu()

    @property
    def num_prompts(self) -> int:
        return len(self) // self.views_per_prompt

    @property
    def centers(self) -> Float[Tensor, "B 3"]:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )

    def index(self, index: Int[Tensor, "K"]) -> Cameras:
        """Select cameras by flat index (the result has one view per prompt)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[index]
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
            views_per_prompt=1,
            host_angles=None,
        )

    @staticmethod
    def concat(items: list[Cameras]) -> Cameras:
        def cat(name: str) -> Tensor:
            return torch.cat([getattr(c, name) for c in items])

        return Cameras(
            c2w=cat("c2w"),
            fovy=cat("fovy"),
            elevation=cat("elevation"),
            azimuth=cat("azimuth"),
            distance=cat("distance"),
            views_per_prompt=1,
        )

    def flat_matrix(self) -> Float[Tensor, "B 16"]:
        """The c2w matrix flattened row-major (the 16-d camera code MVDream-style priors take)."""
        return self.c2w.reshape(len(self), 16)


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one step with their text embeddings (``P`` prompts).

    ``ids`` index the prompts in their corpus split; ``tokens``/``pooled`` come from the prior's
    text encoder (``pooled`` is the EOS state, no projection, as ScaleDreamer's generators use).
    """

    ids: Int[Tensor, "P"]
    texts: tuple[str, ...]
    tokens: Float[Tensor, "P L D"] | None = None
    pooled: Float[Tensor, "P D"] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextEmbedding:
    """Output of a text encoder: all token states and the pooled vector."""

    tokens: Float[Tensor, "P L D"]
    pooled: Float[Tensor, "P D"]


@dataclass(frozen=True)
class Condition:
    """What a prior is conditioned on, row-aligned with its noisy input (``N`` rows).

    ``texts`` holds, for every row, the prompt the row belongs to (also for unconditional rows,
    whose prompt a prior may use, e.g. the procedural prior's mixture includes that prompt's
    scene). ``tokens`` are the text-encoder states actually fed to a network prior (the negative
    prompt's on unconditional rows). ``unconditional`` marks the rows of the unconditional branch.
    """

    texts: tuple[str, ...]
    unconditional: Bool[Tensor, "N"]
    cameras: Cameras
    tokens: Float[Tensor, "N L D"] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @staticmethod
    def concat(items: list[Condition]) -> Condition:
        return Condition(
            **{
                f.name: _concat_field([getattr(c, f.name) for c in items])
                for f in fields(Condition)
            }
        )

    def index(self, index: Int[Tensor, "K"]) -> Condition:
        return Condition(
            **{f.name: _index_field(getattr(self, f.name), index) for f in fields(Condition)}
        )


@dataclass(frozen=True)
class PerpNegConditions:
    """Perp-Neg's view negatives of a batch of ``B`` rows (Armandpour et al. 2023).

    ``negatives`` holds ``K`` conditions (the release: 2), each row-aligned with the positive
    condition; ``weights[b, k]`` is the effective weight of negative ``k`` on row ``b`` (negative
    values push away from it; 0 switches it off, e.g. on overhead views).
    """

    negatives: tuple[Condition, ...]
    weights: Float[Tensor, "B K"]


@dataclass(frozen=True)
class ConditionPair:
    """The positive (prompt) and negative (unconditional / negative prompt) condition of a batch,
    and, when the prior uses Perp-Neg, its view negatives (``None`` otherwise)."""

    positive: Condition
    negative: Condition
    perp_neg: PerpNegConditions | None = None


@dataclass(frozen=True)
class FieldOutput:
    """A field queried at points: signed distance (NeRF fields: raw density) and colour in [0, 1].

    The field owns its colour activation (sigmoid, or the release's ``1.002 sigmoid - 0.001``).
    """

    sdf: Float[Tensor, "P N 1"]
    rgb: Float[Tensor, "P N 3"]


class Field(Protocol):
    """A 3D field for ``P`` prompts; points are grouped per prompt."""

    def __call__(self, points: Float[Tensor, "P N 3"]) -> FieldOutput: ...


@dataclass(frozen=True)
class RenderOutput:
    """Volume-rendered images (``B = P * V``)."""

    rgb: Float[Tensor, "B 3 H W"]
    opacity: Float[Tensor, "B 1 H W"]
    depth: Float[Tensor, "B 1 H W"]
    normals: Float[Tensor, "B 3 H W"] | None = None
    # Regulariser input: SDF gradients at random points in the scene box (eikonal term).
    sdf_gradients: Float[Tensor, "P M 3"] | None = None


@dataclass(frozen=True)
class DistillOutput:
    """A distiller's result: the surrogate loss whose gradient w.r.t. ``z`` is ``grad / B``.

    ``aux_loss`` is the training loss of the distiller's own model, when it has one (VSD's
    noise-prediction MSE of its LoRA / epsilon-net on the detached latents): added to the step's
    loss, its gradient reaches only the distiller's parameters.
    """

    loss: Float[Tensor, ""]
    grad: Float[Tensor, "B C h w"]
    timesteps: Int[Tensor, "B"]
    shifted_timesteps: Int[Tensor, "B"] | None = None
    aux_loss: Float[Tensor, ""] | None = None
    prior_nonfinite: Int[Tensor, ""] | None = None  # NaN/inf elements of the update set to 0

    def metrics(self) -> dict[str, Tensor]:
        out = {
            "t": self.timesteps.float().mean(),
            "grad_norm": self.grad.flatten(1).norm(dim=1).mean(),
        }
        if self.shifted_timesteps is not None:
            out["dt"] = (self.shifted_timesteps - self.timesteps).float().mean()
        if self.aux_loss is not None:
            out["aux_loss"] = self.aux_loss
        if self.prior_nonfinite is not None:
            out["prior_nonfinite"] = self.prior_nonfinite.float()
        return out
