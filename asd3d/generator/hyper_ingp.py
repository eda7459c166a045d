"""Hyper-iNGP: one hash grid shared by all prompts, per-prompt decoders from a hypernetwork.

ScaleDreamer's amortised Instant-NGP (REFERENCE.md §3, after ATT3D): world points in the box
``[-radius, radius]^3`` are mapped to ``[0, 1]^3`` and encoded by one multiresolution hash grid
(16 levels x 2 features, ``2^19`` entries, base resolution 16, scale 1.447 -> 4096); the pooled
text embedding drives a :class:`~asd3d.generator.hypernetwork.HyperNetwork` that emits the
weights of two bias-free ReLU MLPs per prompt, ``32 -> 64 -> 1`` (SDF) and ``32 -> 64 -> 3``
(colour, sigmoid). The SDF gets the analytic sphere bias ``|x| - 0.5`` (world coordinates).

The field also carries the pooled text embedding, so a text-conditioned background in the
renderer (:class:`~asd3d.renderer.background.TextConditionedBackground`, the release's
background hypernetwork) sees the same prompts.

:func:`release_state_dict_to_hyper_ingp` maps a released checkpoint (Lightning ``state_dict``,
keys under ``geometry.``) to this module; the background's keys map with
:func:`asd3d.renderer.background.release_state_dict_to_background`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.generator.base import DecodedField, Generator, TextInput
from asd3d.generator.hashgrid import HashGridBackend, HashGridEncoding
from asd3d.generator.hypernetwork import HyperNetwork, MLPWeights, apply_mlp
from asd3d.generator.release_keys import rename_prefixes
from asd3d.types import PromptBatch


def encode_box_points(
    encoding: HashGridEncoding, points: Float[Tensor, "*B 3"], radius: float
) -> Float[Tensor, "*B C"]:
    """Hash-grid features of world points: the box ``[-radius, radius]^3`` maps to ``[0, 1]^3``."""
    unit = (points / radius + 1.0) * 0.5
    feats = encoding(unit.reshape(-1, 3))
    return feats.reshape(*points.shape[:-1], feats.shape[-1])


class HyperINGPField(DecodedField):
    """A :class:`DecodedField` that also holds its prompts' pooled embedding (``P x D``)."""

    def __init__(self, *args, text_embedding: Float[Tensor, "P D"], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_embedding = text_embedding


class HyperINGPGenerator(Generator):
    """Amortised iNGP: a shared hash grid decoded by hypernetwork-emitted per-prompt MLPs.

    Args:
        text_dim: width ``D`` of ``prompts.pooled`` (1024 for SD 2.1's text encoder).
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale:
            the shared hash grid (:class:`~asd3d.generator.hashgrid.HashGridEncoding`).
        grid_backend: ``auto`` | ``torch`` | ``tcnn`` (see the hash grid).
        hypernet_hidden_features, hypernet_hidden_layers: width and depth of the hypernetwork.
        decoder_hidden: hidden width of the emitted SDF and colour MLPs (release: 64).
        spectral_norm: spectral normalisation on the hypernetwork's linear layers.
        radius: half-edge of the scene box the grid spans (release: 2.0).
        sphere_bias_radius: ``r`` of the analytic SDF bias ``|x| - r`` (release: 0.5).
    """

    text_input: ClassVar[TextInput] = "pooled"

    def __init__(
        self,
        text_dim: int,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        hypernet_hidden_features: int,
        hypernet_hidden_layers: int,
        decoder_hidden: int,
        spectral_norm: bool = False,
        radius: float = 2.0,
        sphere_bias_radius: float | None = 0.5,
        grid_backend: HashGridBackend = "auto",
    ) -> None:
        super().__init__()
        if radius <= 0:
            raise ValueError(f"radius={radius} must be positive")
        self.encoding = HashGridEncoding(
            n_levels,
            n_features_per_level,
            log2_hashmap_size,
            base_resolution,
            per_level_scale,
            backend=grid_backend,
        )
        width = self.encoding.n_output_dims
        # Names and order of the release's ``out_dims`` (the flat output is cut in this order).
        self.hypernet = HyperNetwork(
            text_dim,
            hypernet_hidden_features,
            hypernet_hidden_layers,
            {
                "sdf_weights": [width, decoder_hidden, 1],
                "feature_weights": [width, decoder_hidden, 3],
            },
            spectral_norm=spectral_norm,
        )
        self.radius = float(radius)
        self.sphere_bias_radius = sphere_bias_radius

    def extra_repr(self) -> str:
        return f"radius={self.radius}, sphere_bias_radius={self.sphere_bias_radius}"

    def mlp_weights(self, prompts: PromptBatch) -> MLPWeights:
        """The per-prompt decoder weights the hypernetwork emits for ``prompts``."""
        return self.hypernet(self.text_embedding(prompts))

    def forward(
        self, prompts: PromptBatch, generator: torch.Generator | None = None
    ) -> HyperINGPField:
        """Deterministic: the hypernetwork has no noise input (``generator`` is unused)."""
        text = self.text_embedding(prompts)
        weights = self.hypernet(text)
        return HyperINGPField(
            partial(encode_box_points, self.encoding, radius=self.radius),
            partial(apply_mlp, weights=weights["sdf_weights"]),
            partial(apply_mlp, weights=weights["feature_weights"]),
            self.sphere_bias_radius,
            text_embedding=text,
        )


#: Release prefix -> this module's prefix. threestudio wraps tiny-cuda-nn's encoding twice
#: (``CompositeEncoding`` -> ``TCNNEncoding`` -> ``tcnn.Encoding``); its flat table is ``params``.
HYPER_INGP_RELEASE_RENAMES = {
    "geometry.encoding.encoding.encoding.params": "encoding.params",
    "geometry.hypernet.layers.": "hypernet.layers.",
}


def release_state_dict_to_hyper_ingp(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ScaleDreamer Hyper-iNGP checkpoint's geometry weights to this module's keys.

    Takes the Lightning ``state_dict`` (``geometry.encoding.encoding.encoding.params``,
    ``geometry.hypernet.layers.{0,1,3}.*`` -- with ``weight_orig/_u/_v`` when trained with spectral
    norm) and drops everything else (``geometry.bbox``, the background, the renderer). The hash
    table keeps tiny-cuda-nn's layout, which both grid backends share; it is cast to fp32.
    """
    return rename_prefixes(state, HYPER_INGP_RELEASE_RENAMES, frozenset({"encoding.params"}))
