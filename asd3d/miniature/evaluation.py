"""Sample quality of a pixel-space prior, measured by the procedural oracle.

Every test prompt is sampled (DDIM, classifier-free guidance) at each of ``V`` random training
cameras; a sample *names its prompt* when it is closer (MSE) to that prompt's ground-truth render
at the same camera than to every other prompt's (:func:`asd3d.evaluation.oracle.oracle_retrieval`,
ties count as misses). The sample accuracy is the fraction of samples that do. In a world with
several valid scenes per prompt each prompt's ground truth is its scene nearest to the sample
(:func:`asd3d.evaluation.oracle.best_matching_variants`). The grammar-wide prior's further
measures (retrieval against one-attribute changes, mode coverage) are in
:mod:`asd3d.miniature.grammar_evaluation`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from jaxtyping import Float, Int
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from asd3d.distiller.math import classifier_free_guidance
from asd3d.evaluation.media import enlarge, image_grid, save_png
from asd3d.evaluation.oracle import (
    best_matching_variants,
    oracle_retrieval,
    psnr,
    take_variants,
)
from asd3d.evaluation.procedural import ProceduralOracle
from asd3d.io import atomic_write_text
from asd3d.miniature.error_curve import noise_prediction_error, write_error_curve
from asd3d.prior.base import Prior
from asd3d.types import Cameras, Condition, ConditionPair, PromptBatch


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> Int[Tensor, "S"]:
    """``num_steps`` evenly spaced timesteps from ``T - 1`` down to 0."""
    if num_steps < 1:
        raise ValueError(f"evaluation.num_inference_steps={num_steps} must be >= 1")
    return torch.linspace(num_train_timesteps - 1, 0, num_steps).round().long()


@torch.no_grad()
def ddim_sample(
    prior: Prior,
    conditions: ConditionPair,
    noise: Float[Tensor, "N C h w"],
    guidance_scale: float,
    num_steps: int,
    eps_from_clipped_x0: bool = True,
) -> Float[Tensor, "N C h w"]:
    """Deterministic DDIM (eta = 0; Song et al. 2021, Eq. 12) with classifier-free guidance.

    Each step predicts ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (clipped to
    ``[-1, 1]``, the pixel range) and moves to ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps``;
    the last step returns ``x0``. With ``eps_from_clipped_x0`` the noise is re-derived from the
    clipped ``x0`` (``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``, diffusers'
    ``use_clipped_model_output=True``), so ``x_t``, ``x0`` and ``eps`` stay consistent; without
    it (diffusers' default) the part of a guided ``x0`` that clipping removed moves into the
    noise with the opposite sign, which at CFG 7.5 turns overshooting white backgrounds dark.
    """
    abar = prior.alphas_cumprod.to(noise.device)
    timesteps = ddim_timesteps(abar.shape[0], num_steps).tolist()
    both = Condition.concat([conditions.positive, conditions.negative])
    x = noise
    for i, t in enumerate(timesteps):
        t_batch = torch.full((2 * len(x),), t, dtype=torch.long, device=x.device)
        eps_cond, eps_uncond = prior.predict_eps(torch.cat([x, x]), t_batch, both).chunk(2)
        eps = classifier_free_guidance(eps_cond, eps_uncond, guidance_scale)
        a_s = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else abar.new_tensor(1.0)
        x = ddim_step(x, eps, abar[t], a_s, eps_from_clipped_x0)
    return x


def ddim_step(
    x: Float[Tensor, "N C h w"],
    eps: Float[Tensor, "N C h w"],
    abar_t: Tensor,
    abar_s: Tensor,
    eps_from_clipped_x0: bool = True,
) -> Float[Tensor, "N C h w"]:
    """One deterministic DDIM step from ``t`` to ``s < t`` (``abar_s = 1``: return ``x0``), with
    ``x0`` clipped to ``[-1, 1]`` (see :func:`ddim_sample`)."""
    x0 = ((x - (1.0 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-1.0, 1.0)
    if eps_from_clipped_x0:
        eps = (x - abar_t.sqrt() * x0) / (1.0 - abar_t).sqrt()
    return abar_s.sqrt() * x0 + (1.0 - abar_s).sqrt() * eps


@torch.no_grad()
def sample_grid(
    prior: Prior,
    prompts: list[str],
    cameras: Cameras,
    guidance_scale: float,
    num_steps: int,
    seed: int,
    batch_size: int = 128,
    eps_from_clipped_x0: bool = True,
) -> Float[Tensor, "P V 3 r r"]:
    """One sample per prompt and camera, in ``[0, 1]``."""
    views = len(cameras)
    flat_texts = [text for text in prompts for _ in range(views)]
    flat_cameras = Cameras.concat([cameras] * len(prompts))
    generator = torch.Generator().manual_seed(seed)
    size = prior.encode_images(torch.zeros(1, 3, 1, 1)).shape[-1]
    noise = torch.randn(len(flat_texts), 3, size, size, generator=generator)
    samples = []
    batches = range(0, len(flat_texts), batch_size)
    for start in tqdm(batches, desc=f"DDIM sampling (CFG {guidance_scale:g})", unit="batch"):
        rows = torch.arange(start, min(start + batch_size, len(flat_texts)))
        texts = tuple(flat_texts[i] for i in rows.tolist())
        pair = prior.condition(
            PromptBatch(ids=rows, texts=texts), flat_cameras.index(rows.to(cameras.c2w.device))
        )
        samples.append(
            ddim_sample(prior, pair, noise[rows], guidance_scale, num_steps, eps_from_clipped_x0)
        )
    images = (torch.cat(samples) + 1.0) / 2.0
    return images.view(len(prompts), views, 3, size, size)


def score_samples(
    samples: Float[Tensor, "P V 3 r r"], gt: Float[Tensor, "Q K V 3 r r"], own: list[int]
) -> tuple[Float[Tensor, "P V"], Float[Tensor, "P V"]]:
    """Per sample: whether it names its own prompt (1/0), and its PSNR to its own ground truth,
    every prompt's ground truth being its valid scene (of ``K``) nearest to the sample."""
    named, quality = [], []
    for sample, o in zip(samples, own, strict=True):
        matched = take_variants(gt, best_matching_variants(sample, gt))
        named.append(oracle_retrieval(sample, matched, o).float())
        quality.append(psnr(sample, matched[o]))
    return torch.stack(named), torch.stack(quality)


def evaluate_pretrained(
    pretrained: str | Path, cfg: DictConfig, out: str | Path | None = None
) -> dict:
    """Load ``pretrained`` as ``prior=miniature`` and measure its sample accuracy.

    Writes ``evaluation.json`` and ``samples.png`` (each prompt a row; per camera its sample,
    then the ground truth) and the e(t) curve into ``out`` (default: ``pretrained``).
    """
    from asd3d.prior.miniature import MiniaturePrior

    out = Path(pretrained if out is None else out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = cfg.evaluation
    prior = MiniaturePrior(str(pretrained), text_dim=int(cfg.text_encoder.dim))
    corpus = instantiate(cfg.corpus)
    oracle = ProceduralOracle(corpus, instantiate(cfg.ground_truth))
    prompts = list(oracle.test_texts)
    generator = torch.Generator().manual_seed(int(evaluation.seed))
    cameras = instantiate(cfg.cameras).sample(int(evaluation.num_cameras), generator)
    cameras = cameras.index(torch.arange(len(cameras)))
    samples = sample_grid(
        prior,
        prompts,
        cameras,
        float(evaluation.guidance_scale),
        int(evaluation.num_inference_steps),
        int(evaluation.seed),
        int(evaluation.batch_size),
        bool(evaluation.eps_from_clipped_x0),
    )
    variant_gt, _ = oracle.variant_bank(cameras, prior.resolution)
    named, quality = score_samples(samples, variant_gt, [oracle.own_index(p) for p in prompts])
    gt = variant_gt[:, 0]  # the canonical scenes, shown next to the samples
    result = {
        "sample_accuracy": round(named.mean().item(), 4),
        "sample_psnr_db": round(quality.mean().item(), 2),
        "num_samples": named.numel(),
        "guidance_scale": float(evaluation.guidance_scale),
        "num_inference_steps": int(evaluation.num_inference_steps),
        "eps_from_clipped_x0": bool(evaluation.eps_from_clipped_x0),
        "num_cameras": int(evaluation.num_cameras),
        "seed": int(evaluation.seed),
        "per_prompt_accuracy": {p: round(a, 4) for p, a in zip(prompts, named.mean(1).tolist())},
    }
    if int(evaluation.attribute_changes) > 0:
        from asd3d.miniature.grammar_evaluation import attribute_change_retrieval

        changes = attribute_change_retrieval(
            oracle,
            prompts,
            cameras,
            samples,
            int(evaluation.attribute_changes),
            int(evaluation.seed),
        )
        result["attribute_change_r1"] = round(changes.mean().item(), 4)
        result["attribute_changes"] = int(evaluation.attribute_changes)
    if int(evaluation.mode_seeds) > 0:
        from asd3d.miniature.grammar_evaluation import mode_coverage

        coverage = mode_coverage(
            prior,
            oracle,
            prompts[: int(evaluation.mode_prompts)],
            cameras.index(torch.tensor([0])),
            int(evaluation.mode_seeds),
            float(evaluation.guidance_scale),
            int(evaluation.num_inference_steps),
            int(evaluation.seed) + 1,
            int(evaluation.batch_size),
            bool(evaluation.eps_from_clipped_x0),
        )
        mode_samples = coverage.pop("samples")  # P x S x 3 x r x r: a row per prompt
        save_png(
            image_grid(enlarge(mode_samples.flatten(0, 1), 64), nrow=mode_samples.shape[1]),
            out / "modes.png",
        )
        result["mode_coverage"] = coverage
    if int(evaluation.error_curve_points) > 0:
        result["error_curve"] = error_curve(prior, prompts, cameras, gt, evaluation, out)
    atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
    pairs = torch.stack([samples, gt], dim=2).flatten(0, 2)  # P * V * 2 images
    save_png(image_grid(enlarge(pairs, 64), nrow=2 * len(cameras)), out / "samples.png")
    return result


def error_curve(
    prior: Prior,
    prompts: list[str],
    cameras: Cameras,
    gt: Float[Tensor, "P V 3 r r"],
    evaluation: DictConfig,
    out: Path,
) -> dict:
    """e(t) on the ground-truth images at the evaluation cameras, conditional and unconditional
    (``error_curve.csv`` / ``.png``); returns its end points and whether it falls monotonically."""
    every_prompt = replace(Cameras.concat([cameras] * len(prompts)), views_per_prompt=len(cameras))
    pair = prior.condition(
        PromptBatch(ids=torch.arange(len(prompts)), texts=tuple(prompts)), every_prompt
    )
    x0 = gt.flatten(0, 1) * 2.0 - 1.0  # prompt-major, like the conditions
    timesteps = torch.linspace(20, 980, int(evaluation.error_curve_points)).round().long()
    curves = {
        name: noise_prediction_error(prior, x0, condition, timesteps, seed=int(evaluation.seed))
        for name, condition in (("conditional", pair.positive), ("unconditional", pair.negative))
    }
    write_error_curve(out / "error_curve", timesteps, curves)
    conditional = curves["conditional"]
    return {
        "t": [int(timesteps[0]), int(timesteps[-1])],
        "conditional": [round(conditional[0].item(), 6), round(conditional[-1].item(), 6)],
        "unconditional": [
            round(curves["unconditional"][0].item(), 6),
            round(curves["unconditional"][-1].item(), 6),
        ],
        "conditional_decreasing": bool((conditional[1:] <= conditional[:-1]).all()),
    }
