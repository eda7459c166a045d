"""NeRF volume rendering of density fields (Mildenhall et al. 2020, Eq. 3) for iNGP runs.

The field's scalar output (``FieldOutput.sdf``) is a raw density; the renderer applies the
density activation (threestudio's ``implicit-volume`` with the release's prompt-specific
settings: softplus) and composites with the quadrature shared with VolSDF
(:mod:`asd3d.renderer.base`). Normals for visualisation are the negative normalised density
gradient (central differences). The release marches rays with nerfacc's occupancy grid and 512
samples per ray; here rays are sampled stratified (+ optional importance samples) inside the
scene box, which needs no CUDA extension.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.renderer.base import Shading, VolumeRenderer

DensityActivation = Literal["softplus", "exp", "relu"]
# exp(30) ~ 1e13: beyond any useful density, and keeps the optical depth finite.
_EXP_CLAMP = 30.0


def activate_density(
    raw: Float[Tensor, "*N"], activation: DensityActivation
) -> Float[Tensor, "*N"]:
    """Non-negative density from the raw field output."""
    if activation == "softplus":
        return F.softplus(raw)
    if activation == "exp":
        return torch.exp(raw.clamp(max=_EXP_CLAMP))
    return torch.relu(raw)


class NeRFRenderer(VolumeRenderer):
    """Volume-renders a :class:`~asd3d.types.Field` of raw densities.

    Same call signature and :class:`~asd3d.types.RenderOutput` as
    :class:`~asd3d.renderer.volsdf.VolSDFRenderer` (no ``sdf_gradients``: there is no eikonal
    term for densities).

    Args:
        background, radius, num_samples_stratified, num_samples_importance, near_min,
        background_augmentation_prob, chunk_rays, finite_difference_eps, shading,
        shading_ambient: as in :class:`~asd3d.renderer.base.VolumeRenderer`.
        density_activation: ``softplus`` (release), ``exp`` or ``relu``.
    """

    normal_sign: ClassVar[float] = -1.0

    def __init__(
        self,
        background: nn.Module,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        density_activation: DensityActivation = "softplus",
        near_min: float = 0.05,
        background_augmentation_prob: float = 0.0,
        chunk_rays: int = 65536,
        finite_difference_eps: float = 1e-2,
        shading: Shading = "none",
        shading_ambient: float = 0.3,
    ) -> None:
        if density_activation not in ("softplus", "exp", "relu"):
            raise ValueError(
                f"density_activation={density_activation!r} is not one of softplus, exp, relu"
            )
        super().__init__(
            background,
            radius,
            num_samples_stratified,
            num_samples_importance,
            near_min=near_min,
            background_augmentation_prob=background_augmentation_prob,
            chunk_rays=chunk_rays,
            finite_difference_eps=finite_difference_eps,
            shading=shading,
            shading_ambient=shading_ambient,
        )
        self.density_activation: DensityActivation = density_activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density_activation={self.density_activation}"

    def density(self, values: Float[Tensor, "*N"]) -> Float[Tensor, "*N"]:
        return activate_density(values, self.density_activation)
