"""Ground-truth renders of procedural prompts: the analytic scene through the VolSDF renderer."""

from __future__ import annotations

import torch
from torch import nn

from asd3d.renderer.background import SolidBackground
from asd3d.renderer.volsdf import VolSDFRenderer
from asd3d.types import Cameras, RenderOutput
from asd3d.world.grammar import parse
from asd3d.world.scene import SceneField


class GroundTruthRenderer(nn.Module):
    """Renders ``texts[i]``'s analytic scene from ``cameras[i]`` over a solid background.

    Uses the same volume renderer as the generators (deterministic samples), so a perfect
    generator can match ground truth exactly.
    """

    def __init__(
        self,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        beta: float,
        background_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0),
        chunk_rays: int = 65536,
    ) -> None:
        super().__init__()
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

    @torch.no_grad()
    def forward(self, texts: list[str], cameras: Cameras, resolution: int) -> RenderOutput:
        """One view per text: ``len(texts) == len(cameras)``; images ``N x 3 x r x r``."""
        if len(texts) != len(cameras):
            raise ValueError(
                f"{len(texts)} texts for {len(cameras)} cameras; give one camera per text"
            )
        field = SceneField([parse(text) for text in texts], device=cameras.c2w.device)
        return self.renderer.eval()(field, cameras, resolution, resolution)
