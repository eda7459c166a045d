"""The interface every generator implements, and small pieces generators share.

A generator maps a batch of prompts to a :class:`~asd3d.types.Field`: a function from points
grouped per prompt (``P x N x 3``, world coordinates) to a signed distance and a colour in
``[0, 1]``. The renderer takes that field as a call argument, so one generator call per step
serves every ray of every view of the step's prompts.

Shared helpers (used by the 3DConv-net and meant for Hyper-iNGP / Triplane generators):

* :func:`sphere_sdf_bias` -- the analytic sphere prior ``|x| - r`` added to predicted SDFs
  (ScaleDreamer: ``r = 0.8`` for 3DConv-net and Triplane, ``0.5`` for Hyper-iNGP), which makes
  the untrained field a sphere instead of noise.
* :class:`BiasFreeMLP` / :func:`batched_bias_free_mlp` -- the release's decoders are
  threestudio ``VanillaMLP``s: linear layers without bias, ReLU between them, no output
  activation. The batched form applies per-prompt weights (what a hypernetwork emits).
* :class:`DecodedField` -- "look up features at points, decode SDF and colour".
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.types import Field, FieldOutput, PromptBatch

TextInput = Literal["pooled", "tokens"]


class Generator(nn.Module, abc.ABC):
    """Prompts (with their text embeddings) in, one 3D field per prompt out.

    ``text_input`` says which embedding of :class:`~asd3d.types.PromptBatch` the generator reads:
    ``"pooled"`` (``P x D``, the EOS state) or ``"tokens"`` (``P x L x D``), so the system knows
    what to compute or load from the embedding cache.

    All randomness (latent codes, per-voxel noise) is drawn from the ``generator`` passed to
    :meth:`forward` (the global RNG when it is ``None``), so a seeded ``torch.Generator`` makes a
    call reproducible.
    """

    text_input: ClassVar[TextInput]

    @abc.abstractmethod
    def forward(self, prompts: PromptBatch, generator: torch.Generator | None = None) -> Field:
        """Build the fields of the ``P`` prompts; the result maps ``P x N x 3`` points."""

    def text_embedding(self, prompts: PromptBatch) -> Tensor:
        """The embedding named by ``text_input``, with a clear error when it was not provided."""
        value = getattr(prompts, self.text_input)
        if value is None:
            raise ValueError(
                f"{type(self).__name__} reads prompts.{self.text_input}, "
                "but the PromptBatch has none"
            )
        return value


def sphere_sdf_bias(points: Float[Tensor, "*B 3"], radius: float) -> Float[Tensor, "*B 1"]:
    """Signed distance to a sphere of ``radius`` at the origin: ``|x| - r``."""
    return points.norm(dim=-1, keepdim=True) - radius


class BiasFreeMLP(nn.Module):
    """Linear layers without bias and ReLU between them (threestudio's ``VanillaMLP``).

    ``dims = [in, hidden..., out]``; the 3DConv-net decoders are ``[32, 64, 1]`` and
    ``[32, 64, 3]``. Parameters live in ``self.layers`` (an ``nn.Sequential``), default
    ``nn.Linear`` initialisation as in the release.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an MLP needs at least input and output dims, got {list(dims)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Linear(d_in, d_out, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Float[Tensor, "*B Din"]) -> Float[Tensor, "*B Dout"]:
        return self.layers(x)


def batched_bias_free_mlp(
    x: Float[Tensor, "P N Din"], weights: Sequence[Float[Tensor, "P Dout_i Din_i"]]
) -> Float[Tensor, "P N Dout"]:
    """A bias-free ReLU MLP with one weight set per prompt (e.g. produced by a hypernetwork).

    ``weights[i]`` has the ``nn.Linear`` layout ``out x in`` per prompt.
    """
    for i, w in enumerate(weights):
        if i > 0:
            x = torch.relu(x)
        x = torch.bmm(x, w.transpose(1, 2))
    return x


Decoder = Callable[[Tensor], Tensor]


class DecodedField:
    """A field that looks up features at points and decodes them into SDF and colour.

    ``lookup`` maps ``P x N x 3`` world points to ``P x N x C`` features; the decoders map
    features to ``P x N x 1`` raw SDF and ``P x N x 3`` raw colour. The SDF gets the analytic
    sphere bias (skipped when ``sphere_bias_radius`` is ``None``); colour goes through
    ``rgb_activation`` (sigmoid unless stated).
    """

    def __init__(
        self,
        lookup: Callable[[Tensor], Tensor],
        sdf_decoder: Decoder,
        rgb_decoder: Decoder,
        sphere_bias_radius: float | None,
        rgb_activation: Callable[[Tensor], Tensor] = torch.sigmoid,
    ) -> None:
        self.lookup = lookup
        self.sdf_decoder = sdf_decoder
        self.rgb_decoder = rgb_decoder
        self.sphere_bias_radius = sphere_bias_radius
        self.rgb_activation = rgb_activation

    def features(self, points: Float[Tensor, "P N 3"]) -> Float[Tensor, "P N C"]:
        """The raw per-point features (before the decoders)."""
        return self.lookup(points)

    def __call__(self, points: Float[Tensor, "P N 3"]) -> FieldOutput:
        feats = self.lookup(points)
        sdf = self.sdf_decoder(feats)
        if self.sphere_bias_radius is not None:
            # The bias uses world coordinates, as in the release (not the box-normalised ones).
            sdf = sdf + sphere_sdf_bias(points, self.sphere_bias_radius)
        return FieldOutput(sdf=sdf, rgb=self.rgb_activation(self.rgb_decoder(feats)))
