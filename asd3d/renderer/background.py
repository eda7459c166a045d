"""Backgrounds: what a ray that leaves the scene box without hitting anything sees.

A background maps unit view directions ``(*batch, 3)`` to colours ``(*batch, 3)`` in ``[0, 1]``;
the renderer composites the scene over it (REFERENCE.md §4). A text-conditioned background
(``text_conditioned = True``) also takes the prompts' pooled embedding ``P x D`` and directions
grouped per prompt ``(P, ..., 3)``; the renderer reads the embedding from the field
(``field.text_embedding``, set by Hyper-iNGP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.generator.hashgrid import HashGridBackend, HashGridEncoding
from asd3d.generator.hypernetwork import HyperNetwork, apply_mlp
from asd3d.generator.release_keys import rename_prefixes
from asd3d.generator.triplane import COLOUR_ACTIVATIONS, ColourActivation

MAX_SH_DEGREE = 3


def spherical_harmonics(
    directions: Float[Tensor, "*batch 3"], degree: int
) -> Float[Tensor, "*batch C"]:
    """Real orthonormal spherical harmonics of bands ``l = 0..degree``: ``C = (degree + 1)^2``.

    The basis (and coefficient order) of tiny-cuda-nn's ``SphericalHarmonics`` encoding, whose
    ``n_degrees`` counts bands, i.e. equals ``degree + 1`` here. ``directions`` must be unit.
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"sh degree={degree} is outside [0, {MAX_SH_DEGREE}]")
    x, y, z = directions.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree >= 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * x * z,
            0.54627421529603959 * (xx - yy),
        ]
    if degree >= 3:
        out += [
            0.59004358992664352 * y * (yy - 3 * xx),
            2.8906114426405538 * x * y * z,
            0.45704579946446572 * y * (1 - 5 * zz),
            0.3731763325901154 * z * (5 * zz - 3),
            0.45704579946446572 * x * (1 - 5 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (3 * yy - xx),
        ]
    return torch.stack(out, dim=-1)


class DirectionalBackground(nn.Module):
    """Learned environment colour: SH encoding of the view direction -> small MLP -> sigmoid.

    The release's "neural environment map" background (threestudio's
    ``neural-environment-map-background``, used by its 3DConv-net and Triplane-Transformer runs).
    ``sh_degree`` is the highest SH band, so the default 2 gives 9 coefficients (tiny-cuda-nn's
    ``degree: 3``). ``bias=False`` mirrors the release's bias-free MLPs. The MLP's linear layers
    sit at ``mlp.0``, ``mlp.2``, ... (ReLUs between), the indices of the release's
    ``network.layers``, so :func:`release_state_dict_to_directional_background` only renames.

    Args:
        sh_degree: highest spherical-harmonics band ``l`` (0-3); ``(sh_degree + 1)^2`` inputs.
        hidden_features: width of the hidden layers.
        num_hidden_layers: number of hidden ReLU layers (0: a linear map to colour).
        bias: whether the linear layers have biases.
        colour_activation: ``"sigmoid"`` (the 3DConv-net release) or ``"sigmoid_mipnerf"``
            (``1.002 sigmoid - 0.001``, the Triplane-Transformer release).
    """

    text_conditioned: ClassVar[bool] = False

    def __init__(
        self,
        sh_degree: int = 2,
        hidden_features: int = 16,
        num_hidden_layers: int = 2,
        bias: bool = False,
        colour_activation: ColourActivation = "sigmoid",
    ) -> None:
        super().__init__()
        if colour_activation not in COLOUR_ACTIVATIONS:
            raise ValueError(
                f"colour_activation={colour_activation!r} is not one of "
                f"{' | '.join(COLOUR_ACTIVATIONS)}"
            )
        if not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"sh_degree={sh_degree} is outside [0, {MAX_SH_DEGREE}]")
        if hidden_features < 1 or num_hidden_layers < 0:
            raise ValueError(
                f"hidden_features={hidden_features}, num_hidden_layers="
                f"{num_hidden_layers} must be positive / non-negative"
            )
        self.sh_degree = sh_degree
        widths = [(sh_degree + 1) ** 2] + [hidden_features] * num_hidden_layers + [3]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(w_in, w_out, bias=bias))
            if i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)
        self.colour_activation = COLOUR_ACTIVATIONS[colour_activation]

    def forward(self, directions: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch 3"]:
        directions = nn.functional.normalize(directions, dim=-1)
        return self.colour_activation(self.mlp(spherical_harmonics(directions, self.sh_degree)))


class SolidBackground(nn.Module):
    """A fixed colour in every direction (no parameters): ground-truth renders and tests."""

    rgb: Tensor
    text_conditioned: ClassVar[bool] = False

    def __init__(self, rgb: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if len(rgb) != 3 or not all(0.0 <= float(c) <= 1.0 for c in rgb):
            raise ValueError(f"rgb={tuple(rgb)} must be three values in [0, 1]")
        # Non-persistent: a colour from config, not state to checkpoint.
        self.register_buffer("rgb", torch.tensor([float(c) for c in rgb]), persistent=False)

    def forward(self, directions: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch 3"]:
        return self.rgb.to(directions.dtype).expand(*directions.shape[:-1], 3)


class TextConditionedBackground(nn.Module):
    """Per-prompt environment colour: a direction hash grid decoded by hypernetwork weights.

    The release's background for Hyper-iNGP (``multiprompt-neural-hashgrid-environment-map``):
    unit directions are mapped to ``[0, 1]^3`` (``(d + 1) / 2``) and encoded by a hash grid; the
    pooled text embedding drives a :class:`~asd3d.generator.hypernetwork.HyperNetwork` emitting a
    bias-free ``C -> 64 -> 3`` ReLU MLP per prompt; colour is its sigmoid.

    Args:
        text_dim: width ``D`` of the pooled embedding.
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale:
            the direction hash grid (release: 16 x 2, ``2^19``, 16, scale 1.0 -- every level
            has resolution 16).
        hidden_features: hidden width of the emitted colour MLP (release: 64).
        hypernet_hidden_features, hypernet_hidden_layers: the hypernetwork (release: 64, 1).
        spectral_norm: spectral normalisation on the hypernetwork's linear layers.
        grid_backend: ``auto`` | ``torch`` | ``tcnn``.
    """

    text_conditioned: ClassVar[bool] = True

    def __init__(
        self,
        text_dim: int,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        hidden_features: int,
        hypernet_hidden_features: int,
        hypernet_hidden_layers: int,
        spectral_norm: bool = False,
        grid_backend: HashGridBackend = "auto",
    ) -> None:
        super().__init__()
        self.encoding = HashGridEncoding(
            n_levels,
            n_features_per_level,
            log2_hashmap_size,
            base_resolution,
            per_level_scale,
            backend=grid_backend,
        )
        self.hypernet = HyperNetwork(
            text_dim,
            hypernet_hidden_features,
            hypernet_hidden_layers,
            {"bg_weights": [self.encoding.n_output_dims, hidden_features, 3]},
            spectral_norm=spectral_norm,
        )

    def forward(
        self, directions: Float[Tensor, "P *R 3"], text_embedding: Float[Tensor, "P D"]
    ) -> Float[Tensor, "P *R 3"]:
        if directions.shape[0] != text_embedding.shape[0]:
            raise ValueError(
                f"directions are grouped for {directions.shape[0]} prompts but "
                f"text_embedding has {text_embedding.shape[0]} rows"
            )
        P = directions.shape[0]
        unit = (nn.functional.normalize(directions, dim=-1) + 1.0) * 0.5
        feats = self.encoding(unit.reshape(-1, 3)).reshape(P, -1, self.encoding.n_output_dims)
        weights = self.hypernet(text_embedding)["bg_weights"]
        rgb = torch.sigmoid(apply_mlp(feats, weights))
        return rgb.reshape(*directions.shape[:-1], 3)


#: Release prefix -> :class:`TextConditionedBackground` prefix (threestudio's double-wrapped
#: tiny-cuda-nn encoding, then the hypernetwork's ``nn.Sequential``).
BACKGROUND_RELEASE_RENAMES = {
    "background.encoding.encoding.encoding.params": "encoding.params",
    "background.hypernet.layers.": "hypernet.layers.",
}


def release_state_dict_to_background(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ScaleDreamer Hyper-iNGP checkpoint's ``background.*`` weights to this module.

    Loads into :class:`TextConditionedBackground` (``renderer.background`` of a run); other keys
    are dropped. The hash table is cast to fp32.
    """
    return rename_prefixes(state, BACKGROUND_RELEASE_RENAMES, frozenset({"encoding.params"}))


#: Release prefix -> :class:`DirectionalBackground` prefix (threestudio's ``VanillaMLP`` keeps its
#: layers in ``network.layers``; the SH encoding has no parameters).
DIRECTIONAL_BACKGROUND_RELEASE_RENAMES = {"background.network.layers.": "mlp."}


def release_state_dict_to_directional_background(
    state: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Rename a ScaleDreamer 3DConv-net or Triplane-Transformer checkpoint's background weights.

    The release's ``background.network.layers.{0,2,4}.weight`` (bias-free ``9 -> 16 -> 16 -> 3``)
    load into :class:`DirectionalBackground` with the release's settings (``sh_degree: 2``,
    ``hidden_features: 16``, ``num_hidden_layers: 2``, ``bias: false``; ``colour_activation``
    ``sigmoid`` for 3DConv-net runs, ``sigmoid_mipnerf`` for Triplane runs). Other keys are dropped.
    """
    return rename_prefixes(state, DIRECTIONAL_BACKGROUND_RELEASE_RENAMES)
