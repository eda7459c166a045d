"""Ground-truth renders of procedural prompts: the analytic scene through the VolSDF renderer.

The renderer also holds the world's :class:`~asd3d.world.variation.SceneVariation` (``variants``
valid scenes per prompt): everything that needs ground truth (the exact prior, the oracle, the
miniature prior's training data) reads it from here, so one setting defines the world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from asd3d.renderer.background import SolidBackground
from asd3d.renderer.volsdf import VolSDFRenderer
from asd3d.types import Cameras, RenderOutput
from asd3d.world.scene import SceneField
from asd3d.world.variation import SceneVariation


class GroundTruthRenderer(nn.Module):
    """Renders ``texts[i]``'s analytic scene from ``cameras[i]`` over a solid background.

    Uses the same volume renderer as the generators (deterministic samples), so a perfect
    generator can match ground truth exactly.

    Args:
        variants: ``K``, valid scenes per prompt (``asd3d.world.variation``; 1: one scene, the
            canonical layout, as every config that does not set it).
        variant_seed: selects the non-canonical variants.
    """

    def __init__(
        self,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        beta: float,
        background_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0),
        chunk_rays: int = 65536,
        variants: int = 1,
        variant_seed: int = 0,
    ) -> None:
        super().__init__()
        self.variation = SceneVariation(variants, variant_seed)
        red, green, blue = (float(c) for c in background_rgb)
        self.background_rgb = (red, green, blue)
        self.renderer = VolSDFRenderer(
            background=SolidBackground(self.background_rgb),
            radius=radius,
            num_samples_stratified=num_samples_stratified,
            num_samples_importance=num_samples_importance,
            beta=beta,
            chunk_rays=chunk_rays,
        ).eval()

    @property
    def num_variants(self) -> int:
        """``K``, the valid scenes of every prompt."""
        return self.variation.num_variants

    @torch.no_grad()
    def forward(
        self,
        texts: list[str],
        cameras: Cameras,
        resolution: int,
        variants: Sequence[int] | None = None,
    ) -> RenderOutput:
        """One view per text: ``len(texts) == len(cameras)``; images ``N x 3 x r x r``.
        ``variants[i]`` picks the scene of ``texts[i]`` (default: variant 0, the canonical one)."""
        if len(texts) != len(cameras):
            raise ValueError(
                f"{len(texts)} texts for {len(cameras)} cameras; give one camera per text"
            )
        chosen = [0] * len(texts) if variants is None else [int(k) for k in variants]
        if len(chosen) != len(texts):
            raise ValueError(f"{len(chosen)} variants for {len(texts)} texts")
        specs = [self.variation.scene(text, k) for text, k in zip(texts, chosen, strict=True)]
        field = SceneField(specs, device=cameras.c2w.device)
        return self.renderer.eval()(field, cameras, resolution, resolution)
