"""Triplane-Transformer: text tokens -> transformer over learned triplane tokens -> SDF field.

ScaleDreamer's LRM-style generator (REFERENCE.md §3), re-written after the authors' release
(``custom/amortized/extern/triplane_transformer_modules.py`` with ``local_text: true``, the
setting of its DL17k recipe, and ``custom/amortized/models/geometry/triplane_transformer.py``):

* **Tokens.** ``3 * r^2`` learned query tokens of width ``D`` (``r = token_resolution``), one per
  cell of three ``r x r`` planes, initialised ``~ N(0, 1/D)``; shared by all prompts.
* **Blocks.** ``num_layers`` pre-LN blocks, each
  ``x += CrossAttn(LN(x), text)``, ``x += SelfAttn(LN(x))``, ``x += MLP(LN(x))`` (GELU, ratio 4),
  with multi-head attention in the layout of diffusers' ``Attention`` (bias-free q/k/v, biased
  output projection) computed by ``F.scaled_dot_product_attention``. The text is all ``L`` token
  states of the prior's text encoder (``77 x 1024`` for SD 2.1 / MVDream), unmasked.
* **Planes.** A final LayerNorm, tokens reshaped to ``3`` planes of ``D x r x r``, and one
  bias-free ``ConvTranspose2d(D, C, kernel 2, stride 2)`` -> ``P x 3 x C x 2r x 2r``.
* **Decoding.** A point ``p`` in the box ``[-radius, radius]^3`` is normalised to ``[-1, 1]^3`` and
  looked up bilinearly (``align_corners=False``, zeros outside) in the planes at ``(x, y)``,
  ``(x, z)`` and ``(z, y)``; the three ``C``-vectors are concatenated plane by plane (``3C``) and
  decoded by bias-free ReLU MLPs ``3C -> 64 -> 64 -> 1`` (SDF, plus the sphere bias
  ``|p| - 0.8``) and ``-> 3`` (colour, ``1.002 sigmoid - 0.001`` as the release's
  ``sigmoid-mipnerf``).

:func:`release_state_dict_to_generator` renames a released checkpoint's ``geometry.*`` weights to
this module's keys. The release's other text mode (``local_text: false``: a projected pooled
embedding prepended as one token, no cross-attention) is not implemented.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.generator.base import BiasFreeMLP, DecodedField, Decoder, Generator, TextInput
from asd3d.generator.release_keys import rename_prefixes
from asd3d.types import PromptBatch

ColourActivation = Literal["sigmoid_mipnerf", "sigmoid"]


def sigmoid_mipnerf(x: Tensor, pad: float = 0.001) -> Tensor:
    """``sigmoid(x) (1 + 2 pad) - pad``: the release's colour activation (from mip-NeRF).

    Reaches 0 and 1 at finite ``x``, so saturated black/white do not need infinite features.
    """
    return torch.sigmoid(x) * (1.0 + 2.0 * pad) - pad


COLOUR_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid_mipnerf": sigmoid_mipnerf,
    "sigmoid": torch.sigmoid,
}


class Attention(nn.Module):
    """Multi-head (cross-)attention via SDPA, in diffusers' ``Attention`` parameter layout.

    ``to_q``/``to_k``/``to_v`` have no bias (the release's ``attn_bias=False``), ``to_out`` has
    one; head width ``dim // num_heads``, softmax scale ``1/sqrt(head width)``.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: Float[Tensor, "P T D"]) -> Float[Tensor, "P h T Dh"]:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self, x: Float[Tensor, "P T D"], context: Float[Tensor, "P L Dc"] | None = None
    ) -> Float[Tensor, "P T D"]:
        context = x if context is None else context
        out = F.scaled_dot_product_attention(
            self._heads(self.to_q(x)),
            self._heads(self.to_k(context)),
            self._heads(self.to_v(context)),
        )
        return self.to_out(out.transpose(1, 2).flatten(2))


class TriplaneBlock(nn.Module):
    """Pre-LN block: cross-attention to the text, self-attention, MLP (release names kept).

    ``norm1`` precedes the cross-attention, ``norm2`` the self-attention, ``norm3`` the MLP.
    """

    def __init__(
        self, dim: int, text_dim: int, num_heads: int, mlp_ratio: float, layer_norm_eps: float
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.cross_attn = Attention(dim, text_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.self_attn = Attention(dim, dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim))
        )

    def forward(
        self, x: Float[Tensor, "P T D"], text: Float[Tensor, "P L Dt"]
    ) -> Float[Tensor, "P T D"]:
        x = x + self.cross_attn(self.norm1(x), text)
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class TriplaneTransformer(nn.Module):
    """Learned tokens attend to the text through ``num_layers`` blocks, then become 3 planes.

    Output: ``P x 3 x feature_dim x 2r x 2r`` with ``r = token_resolution``; plane ``i`` is made
    of tokens ``i r^2 .. (i+1) r^2 - 1`` in row-major (row = plane ``H``) order.
    """

    def __init__(
        self,
        text_dim: int,
        width: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float,
        token_resolution: int,
        feature_dim: int,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.token_resolution = token_resolution
        self.query_tokens = nn.Parameter(
            torch.randn(1, 3 * token_resolution**2, width) * width**-0.5
        )
        self.blocks = nn.ModuleList(
            TriplaneBlock(width, text_dim, num_heads, mlp_ratio, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.upsample = nn.ConvTranspose2d(width, feature_dim, kernel_size=2, stride=2, bias=False)

    def forward(self, text: Float[Tensor, "P L Dt"]) -> Float[Tensor, "P 3 C H W"]:
        num_prompts, r = text.shape[0], self.token_resolution
        x = self.query_tokens.expand(num_prompts, -1, -1)
        for block in self.blocks:
            x = block(x, text)
        x = self.norm(x)
        # P (3 r r) D -> (P 3) D r r: every plane of every prompt is one image for the deconv.
        x = x.unflatten(1, (3, r, r)).permute(0, 1, 4, 2, 3).flatten(0, 1)
        return self.upsample(x).unflatten(0, (num_prompts, 3))


def sample_triplane(
    planes: Float[Tensor, "P 3 C H W"], points: Float[Tensor, "P N 3"], radius: float
) -> Float[Tensor, "P N 3C"]:
    """Bilinear lookup of per-prompt triplanes at world points in ``[-radius, radius]^3``.

    Plane 0 is indexed by ``(x, y)``, plane 1 by ``(x, z)``, plane 2 by ``(z, y)`` (first
    coordinate -> plane width ``W``, second -> height ``H``: ``F.grid_sample``'s convention) --
    the release's EG3D-style plane axes. ``align_corners=False``; points outside the box read
    zeros. Features are concatenated plane by plane: ``[f_xy, f_xz, f_zy]``.
    """
    num_prompts, num_planes, channels, height, width = planes.shape
    if points.shape[0] != num_prompts:
        raise ValueError(
            f"points are grouped for {points.shape[0]} prompts, planes have {num_prompts}"
        )
    unit = (points / radius).to(planes.dtype)
    x, y, z = unit.unbind(-1)
    coords = torch.stack(
        [torch.stack(pair, dim=-1) for pair in ((x, y), (x, z), (z, y))], dim=1
    )  # P 3 N 2
    features = F.grid_sample(
        planes.reshape(num_prompts * num_planes, channels, height, width),
        coords.reshape(num_prompts * num_planes, 1, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (P 3) C 1 N
    features = features.reshape(num_prompts, num_planes, channels, -1)
    return features.permute(0, 3, 1, 2).flatten(2)


class TriplaneField(DecodedField):
    """The field of a triplane; keeps ``planes`` (``P x 3 x C x H x W``) for inspection/export."""

    def __init__(
        self,
        planes: Float[Tensor, "P 3 C H W"],
        radius: float,
        sdf_decoder: Decoder,
        rgb_decoder: Decoder,
        sphere_bias_radius: float | None,
        rgb_activation: Callable[[Tensor], Tensor],
    ) -> None:
        super().__init__(
            partial(sample_triplane, planes, radius=radius),
            sdf_decoder,
            rgb_decoder,
            sphere_bias_radius,
            rgb_activation,
        )
        self.planes = planes
        self.radius = radius


class TriplaneTransformerGenerator(Generator):
    """ScaleDreamer's Triplane-Transformer: text token states -> triplane -> SDF + colour field.

    Args:
        text_dim: width ``D`` of ``prompts.tokens`` (1024 for SD 2.1 / MVDream's OpenCLIP-H).
        width: transformer width (768).
        num_layers: transformer blocks (12).
        num_heads: attention heads (16; head width ``width / num_heads``).
        mlp_ratio: hidden width of the block MLPs as a multiple of ``width`` (4).
        token_resolution: edge ``r`` of each plane in tokens (32); planes are ``2r`` after the
            transposed convolution.
        feature_dim: channels ``C`` per plane (32); decoders read ``3C``.
        decoder_hidden: width of the decoders' hidden layers (64).
        decoder_hidden_layers: hidden layers of each decoder (2: ``3C -> 64 -> 64 -> out``).
        layer_norm_eps: epsilon of every LayerNorm (1e-6).
        radius: half-edge of the scene box ``[-radius, radius]^3`` the planes span (2.0).
        sphere_bias_radius: ``r`` of the SDF bias ``|x| - r`` (0.8); ``None`` disables it.
        colour_activation: ``"sigmoid_mipnerf"`` (release) or ``"sigmoid"``.
    """

    text_input: ClassVar[TextInput] = "tokens"

    def __init__(
        self,
        text_dim: int,
        width: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float,
        token_resolution: int,
        feature_dim: int,
        decoder_hidden: int,
        decoder_hidden_layers: int,
        layer_norm_eps: float,
        radius: float,
        sphere_bias_radius: float | None,
        colour_activation: ColourActivation,
    ) -> None:
        super().__init__()
        if colour_activation not in COLOUR_ACTIVATIONS:
            raise ValueError(
                f"colour_activation must be one of {' | '.join(COLOUR_ACTIVATIONS)}, "
                f"got {colour_activation!r}"
            )
        self.radius = float(radius)
        self.sphere_bias_radius = None if sphere_bias_radius is None else float(sphere_bias_radius)
        self.colour_activation = COLOUR_ACTIVATIONS[colour_activation]
        self.transformer = TriplaneTransformer(
            text_dim,
            width,
            num_layers,
            num_heads,
            mlp_ratio,
            token_resolution,
            feature_dim,
            layer_norm_eps,
        )
        hidden = [decoder_hidden] * decoder_hidden_layers
        self.sdf_network = BiasFreeMLP([3 * feature_dim, *hidden, 1])
        self.rgb_network = BiasFreeMLP([3 * feature_dim, *hidden, 3])

    def triplane(self, text: Float[Tensor, "P L D"]) -> Float[Tensor, "P 3 C H W"]:
        """The triplanes of text token states (``P x L x D``)."""
        return self.transformer(text.to(self.transformer.query_tokens.dtype))

    def field(self, planes: Float[Tensor, "P 3 C H W"]) -> TriplaneField:
        """Wrap triplanes with this generator's decoders."""
        return TriplaneField(
            planes,
            self.radius,
            sdf_decoder=self.sdf_network,
            rgb_decoder=self.rgb_network,
            sphere_bias_radius=self.sphere_bias_radius,
            rgb_activation=self.colour_activation,
        )

    def forward(
        self, prompts: PromptBatch, generator: torch.Generator | None = None
    ) -> TriplaneField:
        # Deterministic in the text: ``generator`` is accepted for the interface and unused.
        return self.field(self.triplane(self.text_embedding(prompts)))


# The release's modules (keys under ``geometry.``) -> this generator's modules.
RELEASE_PREFIXES: dict[str, str] = {
    "geometry.space_generator.": "transformer.",
    "geometry.sdf_network.": "sdf_network.",
    "geometry.feature_network.": "rgb_network.",
}
# Then, inside the transformer, the names that differ (regex -> replacement).
RELEASE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^transformer\.pos_embed$", "transformer.query_tokens"),
    (r"^transformer\.layers\.", "transformer.blocks."),
    (r"^transformer\.deconv\.", "transformer.upsample."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
)


def release_state_dict_to_generator(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ScaleDreamer Triplane-Transformer checkpoint's weights to this module's keys.

    Takes the Lightning ``state_dict`` and keeps the generator's keys (``geometry.bbox``,
    ``background.``, ``renderer.`` ... are dropped):

    ==========================================================  =================================
    release (``geometry.`` +)                                   asd3d
    ==========================================================  =================================
    ``space_generator.pos_embed``                               ``transformer.query_tokens``
    ``space_generator.layers.<i>.{norm1,norm2,norm3}.*``        ``transformer.blocks.<i>.<same>``
    ``space_generator.layers.<i>.*_attn.to_{q,k,v}.weight``     ``transformer.blocks.<i>.<same>``
    ``space_generator.layers.<i>.*_attn.to_out.0.*``            ``... .to_out.*``
    ``space_generator.layers.<i>.mlp.0.*`` / ``mlp.3.*``        ``... .mlp.fc1.*`` / ``mlp.fc2.*``
    ``space_generator.norm.*``                                  ``transformer.norm.*``
    ``space_generator.deconv.weight``                           ``transformer.upsample.weight``
    ``sdf_network.layers.*`` / ``feature_network.layers.*``     ``sdf_network.*`` / ``rgb_network.*``
    ==========================================================  =================================

    A checkpoint of the release's ``local_text: false`` variant (a ``space_generator.proj``
    layer) is refused with a clear error.
    """
    for key in state:
        if key.startswith("geometry.space_generator.proj."):
            raise ValueError(
                f"{key}: this checkpoint uses the release's local_text=false variant (pooled text "
                "prepended as a token); asd3d's TriplaneTransformerGenerator implements the "
                "cross-attention variant (local_text=true) only"
            )
    out: dict[str, Tensor] = {}
    for key, value in rename_prefixes(state, RELEASE_PREFIXES).items():
        for pattern, replacement in RELEASE_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out
