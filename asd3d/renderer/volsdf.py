"""VolSDF volume rendering of signed-distance fields (REFERENCE.md §4).

Density from the signed distance (VolSDF, Yariv et al. 2021, Eq. 2-3)::

    sigma(x) = alpha * Psi_beta(-sdf(x)),   alpha = 1 / beta,
    Psi_beta(s) = 0.5 exp(s / beta)            if s <= 0
                = 1 - 0.5 exp(-s / beta)       if s > 0      (Laplace CDF, zero mean, scale beta)

Sampling, compositing, chunking and the background are shared with the NeRF renderer
(:mod:`asd3d.renderer.base`); this module adds the density and the eikonal probes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.renderer.base import (
    Shading,
    VolumeRenderer,
    finite_difference_gradient,
    finite_difference_points,
    query_field,
    random_uniform,
    ray_box_intersection,
)
from asd3d.types import Field

__all__ = ["VolSDFRenderer", "laplace_density", "ray_box_intersection"]

# exp(-60) ~ 1e-26 is still a normal float32; larger exponents produce denormals, which make
# CPU arithmetic several times slower, and contribute nothing visible.
DENSITY_EXPONENT_CLAMP = 60.0


def laplace_density(sdf: Float[Tensor, "*N"], beta: float) -> Float[Tensor, "*N"]:
    """VolSDF density ``(1/beta) Psi_beta(-sdf)`` (Eq. 2-3), exponent clamped against denormals."""
    half = 0.5 * torch.exp(-(sdf.abs() / beta).clamp(max=DENSITY_EXPONENT_CLAMP))
    return torch.where(sdf >= 0, half, 1.0 - half) / beta


class VolSDFRenderer(VolumeRenderer):
    """Volume-renders a :class:`~asd3d.types.Field` of signed distances (REFERENCE.md §4).

    See :class:`~asd3d.renderer.base.VolumeRenderer` for sampling, chunking and the background.
    In training, with ``eikonal_points > 0``, SDF gradients at random points of the box are
    returned for the eikonal loss (one more field call).

    Args:
        background, radius, num_samples_stratified, num_samples_importance, near_min,
        background_augmentation_prob, chunk_rays, finite_difference_eps, shading,
        shading_ambient: as in :class:`~asd3d.renderer.base.VolumeRenderer`.
        beta: Laplace scale of the VolSDF density (release: 1/30, fixed).
        eikonal_points: ``M`` random points in the box per prompt at which, in training, SDF
            gradients are returned for the eikonal loss (0: none).
    """

    normal_sign: ClassVar[float] = 1.0

    def __init__(
        self,
        background: nn.Module,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        beta: float,
        near_min: float = 0.05,
        background_augmentation_prob: float = 0.0,
        eikonal_points: int = 0,
        chunk_rays: int = 65536,
        finite_difference_eps: float = 1e-2,
        shading: Shading = "none",
        shading_ambient: float = 0.3,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta={beta} is out of range")
        if eikonal_points < 0:
            raise ValueError(f"eikonal_points={eikonal_points} is out of range")
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
        self.beta = float(beta)
        self.eikonal_points = int(eikonal_points)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta:.4g}, eikonal_points={self.eikonal_points}"

    def density(self, values: Float[Tensor, "*N"]) -> Float[Tensor, "*N"]:
        return laplace_density(values, self.beta)

    def extra_outputs(
        self, field: Field, num_prompts: int, like: Tensor, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        if self.eikonal_points == 0:
            return {}
        unit = random_uniform((num_prompts, self.eikonal_points, 3), generator, like)
        points = (2.0 * unit - 1.0) * self.radius
        eps = self.finite_difference_eps
        [(sdf, _)] = query_field(field, finite_difference_points(points, eps))
        return {"sdf_gradients": finite_difference_gradient(sdf, eps)}
