"""Oracle scoring on the procedural world, where every test prompt's ground truth is known."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.evaluation.oracle import (
    best_matching_variants,
    mask_iou,
    oracle_retrieval,
    psnr,
    take_variants,
)
from asd3d.types import Cameras, RenderOutput
from asd3d.world.ground_truth import GroundTruthRenderer


@torch.no_grad()
def render_variant_bank(
    ground_truth: GroundTruthRenderer,
    texts: list[str],
    cameras: Cameras,
    resolution: int,
    chunk_views: int = 256,
) -> tuple[Float[Tensor, "Q K V 3 r r"], Float[Tensor, "Q K V 1 r r"]]:
    """Ground truth of each of the ``K`` valid scenes of each of ``Q`` prompts at ``V`` cameras."""
    q, k, v = len(texts), ground_truth.num_variants, len(cameras)
    flat_texts = [t for t in texts for _ in range(k * v)]
    variants = [j for _ in range(q) for j in range(k) for _ in range(v)]
    flat = Cameras.concat([cameras] * (q * k))
    rgb, opacity = [], []
    for start in range(0, len(flat_texts), chunk_views):
        stop = min(start + chunk_views, len(flat_texts))
        out = ground_truth(
            flat_texts[start:stop],
            flat.index(torch.arange(start, stop, device=flat.c2w.device)),
            resolution,
            variants[start:stop],
        )
        rgb.append(out.rgb)
        opacity.append(out.opacity)
    return (
        torch.cat(rgb).view(q, k, v, 3, resolution, resolution),
        torch.cat(opacity).view(q, k, v, 1, resolution, resolution),
    )


@dataclass(frozen=True)
class PromptScores:
    """Per-prompt oracle metrics, each averaged over the prompt's views (``P``)."""

    r_at_1: Float[Tensor, "P"]
    psnr: Float[Tensor, "P"]
    iou: Float[Tensor, "P"]


class ProceduralOracle:
    """Scores renders against the ground truth of all test prompts at the same cameras.

    R@1 of a view: its own prompt's ground truth is the nearest (MSE) among all ``Q`` test prompts'
    ground truths at that camera. PSNR and mask IoU compare with the own ground truth. Renders must
    be composited over :attr:`background_rgb`, the ground truth's background.

    In a world with ``K > 1`` valid scenes per prompt (``ground_truth.variants``) a prompt's
    ground truth at a view is its scene nearest to the render there
    (:func:`~asd3d.evaluation.oracle.best_matching_variants`): a render of any valid scene
    scores as well as a render of the canonical one.
    """

    def __init__(
        self, corpus: ProceduralCorpus, ground_truth: GroundTruthRenderer, chunk_views: int = 256
    ) -> None:
        self.corpus = corpus
        self.ground_truth = ground_truth
        self.chunk_views = chunk_views
        self.test_texts = corpus.prompts("test", range(corpus.size("test")))
        self._index = {text: i for i, text in enumerate(self.test_texts)}
        self._bank_key: tuple | None = None
        self._bank: RenderOutput | None = None

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        return self.ground_truth.background_rgb

    @staticmethod
    def applies_to(corpus: object) -> bool:
        return isinstance(corpus, ProceduralCorpus)

    def bank(
        self, cameras: Cameras, resolution: int
    ) -> tuple[Float[Tensor, "Q V 3 r r"], Float[Tensor, "Q V 1 r r"]]:
        """Ground truth of every test prompt's canonical scene (variant 0) at the ``V`` cameras."""
        rgb, opacity = self.variant_bank(cameras, resolution)
        return rgb[:, 0], opacity[:, 0]

    def variant_bank(
        self, cameras: Cameras, resolution: int
    ) -> tuple[Float[Tensor, "Q K V 3 r r"], Float[Tensor, "Q K V 1 r r"]]:
        """Ground truth of each of the ``K`` valid scenes of every test prompt at the ``V``
        cameras (computed once, then cached)."""
        key = (
            resolution,
            cameras.c2w.cpu().numpy().tobytes(),
            cameras.fovy.cpu().numpy().tobytes(),
        )
        if self._bank_key != key:
            rgb, opacity = render_variant_bank(
                self.ground_truth, self.test_texts, cameras, resolution, self.chunk_views
            )
            self._bank = RenderOutput(rgb=rgb, opacity=opacity, depth=torch.empty(0))
            self._bank_key = key
        assert self._bank is not None
        return self._bank.rgb, self._bank.opacity

    def matched_bank(
        self, render: Float[Tensor, "V 3 r r"], cameras: Cameras
    ) -> tuple[Float[Tensor, "Q V 3 r r"], Float[Tensor, "Q V 1 r r"]]:
        """Every test prompt's ground truth at the ``V`` cameras, each view the prompt's valid
        scene nearest to ``render`` there (the only scene when ``K = 1``)."""
        gt_rgb, gt_opacity = self.variant_bank(cameras, render.shape[-1])
        gt_rgb, gt_opacity = gt_rgb.to(render.device), gt_opacity.to(render.device)
        if gt_rgb.shape[1] == 1:
            return gt_rgb[:, 0], gt_opacity[:, 0]
        index = best_matching_variants(render, gt_rgb)
        return take_variants(gt_rgb, index), take_variants(gt_opacity, index)

    def own_index(self, text: str) -> int:
        if text not in self._index:
            raise ValueError(
                f"prompt {text!r} is not in the corpus's test split; oracle metrics score test prompts"
            )
        return self._index[text]

    @torch.no_grad()
    def score(self, texts: tuple[str, ...], render: RenderOutput, cameras: Cameras) -> PromptScores:
        """Score ``P`` prompts rendered from the same ``V`` cameras (``render`` is ``P*V`` views).

        ``cameras`` are the ``V`` cameras of one prompt.
        """
        v = len(cameras)
        size = render.rgb.shape[-1]
        rgb = render.rgb.view(len(texts), v, 3, size, size)
        opacity = render.opacity.view(len(texts), v, 1, size, size)
        r1, p, iou = [], [], []
        for i, text in enumerate(texts):
            own = self.own_index(text)
            gt_rgb, gt_opacity = self.matched_bank(rgb[i], cameras)
            r1.append(oracle_retrieval(rgb[i], gt_rgb, own).float().mean())
            p.append(psnr(rgb[i], gt_rgb[own]).mean())
            iou.append(mask_iou(opacity[i], gt_opacity[own]).mean())
        return PromptScores(torch.stack(r1), torch.stack(p), torch.stack(iou))
