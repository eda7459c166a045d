"""Oracle metrics of the procedural world (DESIGN §3): renders scored against known ground truth.

Pure tensor functions; they know nothing about scenes or corpora. The caller renders the ground
truth of the test prompts at the evaluation cameras and passes images in.

* :func:`psnr` and :func:`mask_iou` compare a prompt's render with its own ground truth.
* :func:`oracle_retrieval` is the oracle analogue of CLIP R@1 (REFERENCE §7): a view "retrieves"
  its prompt when the render is closer (MSE) to the prompt's own ground truth than to the ground
  truth of every other test prompt at the same camera. Averaged over views, then prompts.
* :class:`OracleMetrics` accumulates per-prompt values across batches and DDP ranks.
* :func:`best_matching_variants` serves worlds with several valid scenes per prompt: every
  metric compares a render with the valid scene of each prompt nearest to it (per view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "PSNR_MAX_DB",
    "OracleMetrics",
    "OracleScores",
    "best_matching_variants",
    "mask_iou",
    "oracle_retrieval",
    "prompt_oracle_scores",
    "psnr",
    "retrieval_mse",
    "retrieves_own",
    "take_variants",
]

#: PSNR of identical images. A finite cap (MSE floored at 1e-10) keeps means over views and
#: prompts finite; 100 dB is far above anything a renderer reaches (8-bit quantisation alone
#: limits a real image to about 59 dB), so the cap never alters a meaningful value.
PSNR_MAX_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_MAX_DB / 10.0)


def psnr(pred: Float[Tensor, "B 3 H W"], target: Float[Tensor, "B 3 H W"]) -> Float[Tensor, " B"]:
    """Peak signal-to-noise ratio in dB per image, for images in ``[0, 1]`` (peak 1).

    ``10 log10(1 / MSE)`` with the MSE over channels and pixels; identical images give
    :data:`PSNR_MAX_DB` (100 dB) instead of ``inf``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    # float32 at least: a bf16/fp16 render would quantise the MSE and with it the dB value.
    mse = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(_MSE_FLOOR))


def mask_iou(
    pred_opacity: Float[Tensor, "B 1 H W"],
    target_opacity: Float[Tensor, "B 1 H W"],
    threshold: float = 0.5,
) -> Float[Tensor, " B"]:
    """Intersection over union of the silhouettes ``opacity > threshold`` per image.

    The comparison is strict, so a pixel at exactly ``threshold`` is background. Two empty
    silhouettes count as a perfect match (IoU 1.0): an empty scene rendered empty is correct.
    """
    if pred_opacity.shape != target_opacity.shape:
        raise ValueError(
            f"mask_iou: shapes differ, {tuple(pred_opacity.shape)} vs {tuple(target_opacity.shape)}"
        )
    pred = (pred_opacity > threshold).flatten(1)
    target = (target_opacity > threshold).flatten(1)
    intersection = (pred & target).sum(dim=1).float()
    union = (pred | target).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))


def retrieval_mse(
    render: Float[Tensor, "V 3 H W"], gt: Float[Tensor, "Q V 3 H W"]
) -> Float[Tensor, "Q V"]:
    """MSE of each view of one prompt's render to the ground truth of each of ``Q`` prompts.

    Split over ``Q`` freely (e.g. render the ground truths in chunks and ``torch.cat`` the
    results along dim 0): each row depends only on its own prompt's ground truth.
    """
    if gt.shape[1:] != render.shape:
        raise ValueError(
            f"retrieval_mse: gt {tuple(gt.shape)} does not match render "
            f"{tuple(render.shape)} (expected Q x V x 3 x H x W)"
        )
    render = render.float()
    # A loop over prompts keeps the temporary at one prompt's size instead of Q x V x 3 x H x W.
    return torch.stack([(g.float() - render).square().flatten(1).mean(dim=1) for g in gt])


def best_matching_variants(
    render: Float[Tensor, "V 3 H W"], variants: Float[Tensor, "Q K V 3 H W"]
) -> Int[Tensor, "Q V"]:
    """For each prompt and view, the index of the prompt's valid scene (one of ``K``) whose
    ground truth is nearest (MSE) to the render; the first one on ties.

    A world whose prompts each allow ``K`` scenes scores a render against the best-matching
    one: gather with ``variants[q, k[q, v], v]`` and pass the result wherever a ``Q x V``
    ground truth is expected (``K = 1`` gives back the single ground truth).
    """
    if variants.ndim != 6 or variants.shape[2:] != render.shape:
        raise ValueError(
            f"best_matching_variants: variants {tuple(variants.shape)} does not match render "
            f"{tuple(render.shape)} (expected Q x K x V x 3 x H x W)"
        )
    render = render.float()
    # One prompt at a time keeps the temporary at K x V x 3 x H x W.
    return torch.stack(
        [(g.float() - render).square().flatten(2).mean(dim=2).argmin(dim=0) for g in variants]
    )


def take_variants(
    variants: Float[Tensor, "Q K V ..."], index: Int[Tensor, "Q V"]
) -> Float[Tensor, "Q V ..."]:
    """``out[q, v] = variants[q, index[q, v], v]``."""
    q, _, v = variants.shape[:3]
    rows = torch.arange(q, device=variants.device).view(q, 1).expand(q, v)
    views = torch.arange(v, device=variants.device).view(1, v).expand(q, v)
    return variants[rows, index.to(variants.device), views]


def retrieves_own(mse: Float[Tensor, "Q V"], own: int) -> Bool[Tensor, " V"]:
    """Whether each view is strictly closer to prompt ``own``'s ground truth than to any other.

    Tie rule: a view whose MSE to another prompt's ground truth *equals* its MSE to its own
    counts as a miss. This makes the result independent of prompt order and conservative: a
    render that is equally far from two prompts (e.g. two test prompts with the same scene at
    that camera, or a blank render) has not identified its prompt.
    """
    num_prompts = mse.shape[0]
    if not 0 <= own < num_prompts:
        raise IndexError(f"retrieves_own: own={own} is outside the {num_prompts} test prompts")
    others = torch.cat([mse[:own], mse[own + 1 :]])
    if others.shape[0] == 0:  # a single test prompt retrieves itself trivially
        return torch.ones(mse.shape[1], dtype=torch.bool, device=mse.device)
    return mse[own] < others.min(dim=0).values


def oracle_retrieval(
    render: Float[Tensor, "V 3 H W"], gt: Float[Tensor, "Q V 3 H W"], own: int
) -> Bool[Tensor, " V"]:
    """Oracle R@1 per view of one prompt: is the render closest to its own prompt's ground truth?

    ``gt`` holds the ground truths of all ``Q`` test prompts at the same ``V`` cameras as the
    render; ``own`` indexes the rendered prompt in it. Ties count as misses (see
    :func:`retrieves_own`). For a large ``Q`` compute :func:`retrieval_mse` in chunks instead.
    """
    return retrieves_own(retrieval_mse(render, gt), own)


@dataclass(frozen=True)
class OracleScores:
    """One prompt's oracle scores, each averaged over its views (0-dim tensors)."""

    r_at_1: Float[Tensor, ""]
    psnr: Float[Tensor, ""]
    mask_iou: Float[Tensor, ""]


def prompt_oracle_scores(
    rgb: Float[Tensor, "V 3 H W"],
    opacity: Float[Tensor, "V 1 H W"],
    gt_rgb: Float[Tensor, "Q V 3 H W"],
    gt_opacity: Float[Tensor, "V 1 H W"],
    own: int,
    threshold: float = 0.5,
) -> OracleScores:
    """All oracle scores of one prompt from its ``V`` views, averaged over the views.

    ``gt_rgb`` holds every test prompt's ground truth (for retrieval); ``gt_opacity`` is the own
    prompt's ground-truth silhouette.
    """
    return OracleScores(
        r_at_1=oracle_retrieval(rgb, gt_rgb, own).float().mean(),
        psnr=psnr(rgb, gt_rgb[own]).mean(),
        mask_iou=mask_iou(opacity, gt_opacity, threshold).mean(),
    )


class OracleMetrics(Metric):
    """Means over prompts of oracle R@1, PSNR and mask IoU, exact across DDP shards.

    ``update`` takes per-prompt values (already averaged over each prompt's views); the states
    are sums plus a prompt count, all reduced with ``"sum"``, so sharding prompts over ranks
    gives the same result as one process (up to float rounding). Sums are float64 so 100k+
    prompts accumulate without drift.

    Notes for the caller:

    * Under ``strategy=ddp_spawn`` the state can be shared by both ranks during epoch 0 and be
      counted twice (STACK.md); call ``metric.reset()`` in the LightningModule's
      ``on_fit_start`` (and before each evaluation pass).
    * Every ``update`` counts: a sampler that pads shards by repeating prompts (Lightning's
      default ``DistributedSampler``) double-counts them. Shard test prompts without padding.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    r_at_1_sum: Tensor
    psnr_sum: Tensor
    iou_sum: Tensor
    num_prompts: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("r_at_1_sum", "psnr_sum", "iou_sum", "num_prompts"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(
        self, r_at_1: Float[Tensor, " P"], psnr: Float[Tensor, " P"], iou: Float[Tensor, " P"]
    ) -> None:
        """Add ``P`` prompts' scores (each a mean over that prompt's views)."""
        values = [
            torch.as_tensor(v, device=self.num_prompts.device).detach().reshape(-1)
            for v in (r_at_1, psnr, iou)
        ]
        if len({v.numel() for v in values}) != 1:
            raise ValueError(
                "OracleMetrics.update: r_at_1, psnr and iou must hold one value per "
                f"prompt each, got sizes {[v.numel() for v in values]}"
            )
        r_at_1, psnr, iou = (v.double() for v in values)
        self.r_at_1_sum += r_at_1.sum()
        self.psnr_sum += psnr.sum()
        self.iou_sum += iou.sum()
        self.num_prompts += r_at_1.numel()

    def compute(self) -> dict[str, Tensor]:
        """Means over all prompts seen: ``oracle_r1``, ``psnr`` (dB) and ``mask_iou`` (float32).

        NaN when no prompt has been added.
        """
        count = self.num_prompts
        return {
            "oracle_r1": (self.r_at_1_sum / count).float(),
            "psnr": (self.psnr_sum / count).float(),
            "mask_iou": (self.iou_sum / count).float(),
        }
