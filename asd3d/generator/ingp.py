"""iNGP: a prompt-specific field, one hash grid and two small MLPs (REFERENCE.md §3).

The release's single-prompt runs use threestudio's ``implicit-volume`` geometry: world points in
the box ``[-radius, radius]^3`` (radius 1.0) are mapped to ``[0, 1]^3``, encoded by a hash grid
(16 levels x 2 features, ``2^19`` entries, base resolution 16, scale 1.447 -> 4096) and decoded by
bias-free ReLU MLPs ``32 -> 64 -> 1`` (raw density) and ``32 -> 64 -> 3`` (colour, sigmoid). The raw
density gets Magic3D's blob bias ``s (1 - |x| / std)`` (scale 10, std 0.5) so the untrained field
is a soft ball; the NeRF renderer applies the density activation (softplus).

``output: sdf`` turns the same network into an SDF field (sphere bias ``|x| - r`` instead of the
blob) for the VolSDF renderer.

Being prompt-specific, the field ignores the text: every prompt of a batch gets the same field,
and a run trains it on a corpus of one prompt.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.generator.base import BiasFreeMLP, DecodedField, Generator, TextInput
from asd3d.generator.hashgrid import HashGridBackend, HashGridEncoding
from asd3d.generator.hyper_ingp import encode_box_points
from asd3d.types import FieldOutput, PromptBatch

FieldKind = Literal["density", "sdf"]


def magic3d_blob(points: Float[Tensor, "*N 3"], scale: float, std: float) -> Float[Tensor, "*N 1"]:
    """Magic3D's density bias ``scale * (1 - |x| / std)``: positive inside a ball of radius ``std``."""
    return scale * (1.0 - points.norm(dim=-1, keepdim=True) / std)


class INGPField(DecodedField):
    """A decoded hash-grid field; for densities, the blob bias is added to the raw output."""

    def __init__(self, *args, blob: tuple[float, float] | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blob = blob

    def __call__(self, points: Float[Tensor, "P N 3"]) -> FieldOutput:
        out = super().__call__(points)
        if self.blob is None:
            return out
        return FieldOutput(sdf=out.sdf + magic3d_blob(points, *self.blob), rgb=out.rgb)


class INGPGenerator(Generator):
    """Prompt-specific Instant-NGP field (one hash grid, bias-free MLP decoders).

    ``text_input`` is ``pooled`` only so that the system's embedding path is unchanged; the text is
    not read.

    Args:
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale:
            the hash grid (:class:`~asd3d.generator.hashgrid.HashGridEncoding`).
        grid_backend: ``auto`` | ``torch`` | ``tcnn``.
        decoder_hidden: hidden width of the two MLPs (release: 64).
        radius: half-edge of the box the grid spans (release: 1.0).
        output: ``density`` (raw density + blob, for the NeRF renderer) or ``sdf`` (+ sphere
            bias, for VolSDF).
        density_blob_scale, density_blob_std: Magic3D blob (release: 10, 0.5); density only.
        sphere_bias_radius: ``r`` of ``|x| - r``; sdf only.
    """

    text_input: ClassVar[TextInput] = "pooled"

    def __init__(
        self,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        decoder_hidden: int,
        radius: float = 1.0,
        output: FieldKind = "density",
        density_blob_scale: float = 10.0,
        density_blob_std: float = 0.5,
        sphere_bias_radius: float = 0.5,
        grid_backend: HashGridBackend = "auto",
    ) -> None:
        super().__init__()
        if output not in ("density", "sdf"):
            raise ValueError(f"output={output!r} is not one of density, sdf")
        if radius <= 0 or density_blob_std <= 0:
            raise ValueError(
                f"radius={radius} and density_blob_std={density_blob_std} must be positive"
            )
        self.encoding = HashGridEncoding(
            n_levels,
            n_features_per_level,
            log2_hashmap_size,
            base_resolution,
            per_level_scale,
            backend=grid_backend,
        )
        width = self.encoding.n_output_dims
        # threestudio's names: density_network / feature_network.
        self.density_network = BiasFreeMLP([width, decoder_hidden, 1])
        self.feature_network = BiasFreeMLP([width, decoder_hidden, 3])
        self.radius = float(radius)
        self.output: FieldKind = output
        self.density_blob = (float(density_blob_scale), float(density_blob_std))
        self.sphere_bias_radius = float(sphere_bias_radius)

    def extra_repr(self) -> str:
        bias = (
            f"blob={self.density_blob}"
            if self.output == "density"
            else (f"sphere_bias_radius={self.sphere_bias_radius}")
        )
        return f"radius={self.radius}, output={self.output}, {bias}"

    def forward(self, prompts: PromptBatch, generator: torch.Generator | None = None) -> INGPField:
        """The one field, for every prompt of the batch (``generator`` is unused)."""
        density = self.output == "density"
        return INGPField(
            partial(encode_box_points, self.encoding, radius=self.radius),
            self.density_network,
            self.feature_network,
            None if density else self.sphere_bias_radius,
            blob=self.density_blob if density else None,
        )
