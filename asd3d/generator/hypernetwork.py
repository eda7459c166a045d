"""A hypernetwork: a text embedding in, the weights of small per-prompt MLPs out (ATT3D-style).

ScaleDreamer's Hyper-iNGP (REFERENCE.md §3) and its text-conditioned background both use it:
``Linear(D -> H, no bias) -> LayerNorm -> SiLU`` (then ``hidden_layers - 1`` times
``Linear(H -> H) -> LayerNorm -> SiLU``) ``-> Linear(H -> sum of weight sizes)``. The flat output
is cut, in the order the MLPs are named, into one ``in x out`` matrix per layer of each MLP (the
release's layout: row-major ``in x out`` blocks); the MLPs are bias-free with ReLU between layers.
Linear layers are Xavier-normal initialised with zero biases, as in the release; optional spectral
normalisation (``torch.nn.utils.spectral_norm``, whose parameter names the release's checkpoints
use) bounds the emitted weights, which the paper needs with SDS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.generator.base import batched_bias_free_mlp

#: Per MLP name, its per-prompt weight matrices (``P x in x out``), one per layer.
MLPWeights = dict[str, list[Float[Tensor, "P Din Dout"]]]


class HyperNetwork(nn.Module):
    """Text embedding ``P x D`` -> per-prompt weights of bias-free MLPs.

    Args:
        text_dim: width ``D`` of the conditioning embedding.
        hidden_features: width ``H`` of the hypernetwork (release: 64).
        hidden_layers: number of ``Linear -> LayerNorm -> SiLU`` blocks (release: 1).
        mlp_dims: per emitted MLP, its layer widths ``[in, hidden..., out]`` (insertion order is
            the order of the flat output).
        spectral_norm: wrap every linear layer in spectral normalisation.

    Parameters live in ``self.layers`` (an ``nn.Sequential``) under the release's names.
    """

    def __init__(
        self,
        text_dim: int,
        hidden_features: int,
        hidden_layers: int,
        mlp_dims: Mapping[str, Sequence[int]],
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if text_dim < 1 or hidden_features < 1 or hidden_layers < 1:
            raise ValueError(
                f"text_dim={text_dim}, hidden_features={hidden_features}, "
                f"hidden_layers={hidden_layers} must all be >= 1"
            )
        self.mlp_dims = {name: [int(d) for d in dims] for name, dims in mlp_dims.items()}
        for name, dims in self.mlp_dims.items():
            if len(dims) < 2 or min(dims) < 1:
                raise ValueError(f"mlp_dims[{name!r}]={dims} needs >= 2 positive widths")
        self.num_outputs = sum(
            d_in * d_out
            for dims in self.mlp_dims.values()
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.spectral_norm = spectral_norm

        def linear(d_in: int, d_out: int, bias: bool) -> nn.Module:
            layer = nn.Linear(d_in, d_out, bias=bias)
            nn.init.xavier_normal_(layer.weight, gain=1.0)
            if bias:
                nn.init.zeros_(layer.bias)
            return nn.utils.spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = [
            linear(text_dim, hidden_features, bias=False),
            nn.LayerNorm(hidden_features),
            nn.SiLU(),
        ]
        for _ in range(hidden_layers - 1):
            layers += [
                linear(hidden_features, hidden_features, bias=True),
                nn.LayerNorm(hidden_features),
                nn.SiLU(),
            ]
        layers.append(linear(hidden_features, self.num_outputs, bias=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, text: Float[Tensor, "P D"]) -> MLPWeights:
        # Always fp32: tiny weights emitted under autocast lose most of their bits.
        with torch.autocast(device_type=text.device.type, enabled=False):
            flat = self.layers(text.float())
        out: MLPWeights = {}
        start = 0
        for name, dims in self.mlp_dims.items():
            out[name] = []
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
                block = flat[:, start : start + d_in * d_out]
                out[name].append(block.reshape(-1, d_in, d_out))
                start += d_in * d_out
        return out


def apply_mlp(
    x: Float[Tensor, "P N Din"], weights: Sequence[Float[Tensor, "P Din_i Dout_i"]]
) -> Float[Tensor, "P N Dout"]:
    """Run a per-prompt bias-free ReLU MLP given as ``in x out`` matrices (hypernetwork layout)."""
    return batched_bias_free_mlp(x, [w.transpose(1, 2) for w in weights])
