"""The grammar-wide prior's targets: retrieval against one-attribute changes, and mode coverage.

* **R@1 against one-attribute changes**: each sample of a test prompt competes with ``C``
  prompts that differ from it in one attribute (``asd3d.world.grammar.one_attribute_changes``);
  it names its prompt when its prompt's best-matching valid scene is strictly nearer (MSE) than
  every changed prompt's. Harder than the sample accuracy among the test prompts, which differ
  from each other in many attributes at once.
* **Mode coverage**: a prompt at one camera sampled with ``S`` seeds; each sample that names its
  prompt (among the test prompts) is assigned the prompt's valid scene nearest to it. Coverage
  is the number of distinct scenes those samples hit (of ``K``): a prior that collapsed onto one
  layout covers 1, one that draws the world's variation covers up to ``K``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.evaluation.oracle import best_matching_variants, oracle_retrieval, take_variants
from asd3d.evaluation.procedural import ProceduralOracle, render_variant_bank
from asd3d.miniature.evaluation import sample_grid
from asd3d.prior.base import Prior
from asd3d.types import Cameras
from asd3d.world.grammar import one_attribute_changes


@torch.no_grad()
def attribute_change_retrieval(
    oracle: ProceduralOracle,
    prompts: list[str],
    cameras: Cameras,
    samples: Float[Tensor, "P V 3 r r"],
    num_changes: int,
    seed: int,
) -> Float[Tensor, "P V"]:
    """Per sample: 1 when it is nearer its own prompt than each of ``num_changes`` prompts that
    differ from it in one attribute (best-matching valid scene of each), else 0."""
    named = []
    for text, sample in zip(prompts, samples, strict=True):
        candidates = [text, *one_attribute_changes(text, num_changes, seed)]
        bank, _ = render_variant_bank(
            oracle.ground_truth, candidates, cameras, sample.shape[-1], oracle.chunk_views
        )
        matched = take_variants(bank, best_matching_variants(sample, bank))
        named.append(oracle_retrieval(sample, matched, 0).float())
    return torch.stack(named)


@torch.no_grad()
def mode_coverage(
    prior: Prior,
    oracle: ProceduralOracle,
    prompts: list[str],
    camera: Cameras,
    num_seeds: int,
    guidance_scale: float,
    num_steps: int,
    seed: int,
    batch_size: int = 128,
    eps_from_clipped_x0: bool = True,
) -> dict:
    """Sample each prompt ``num_seeds`` times at one camera; count the valid scenes hit.

    Returns per prompt the scenes hit by its samples that name it, their mean and the share of
    samples that name their prompt; also the samples themselves (``P x S x 3 x r x r``).
    """
    if num_seeds < 1:
        raise ValueError(f"evaluation.mode_seeds={num_seeds} must be >= 1")
    repeated = Cameras.concat([camera] * num_seeds)  # one noise per (prompt, copy)
    samples = sample_grid(
        prior,
        prompts,
        repeated,
        guidance_scale,
        num_steps,
        seed,
        batch_size,
        eps_from_clipped_x0,
    )
    bank, _ = oracle.variant_bank(repeated, samples.shape[-1])
    hits, valid = [], []
    for text, prompt_samples in zip(prompts, samples, strict=True):
        own = oracle.own_index(text)
        index = best_matching_variants(prompt_samples, bank)
        named = oracle_retrieval(prompt_samples, take_variants(bank, index), own)
        valid.append(named.float().mean().item())
        hits.append(sorted(set(index[own][named].tolist())))
    return {
        "scenes_hit": {text: hit for text, hit in zip(prompts, hits, strict=True)},
        "mean_scenes_hit": round(sum(len(h) for h in hits) / len(hits), 3),
        "num_variants": oracle.ground_truth.num_variants,
        "num_seeds": num_seeds,
        "valid_share": round(sum(valid) / len(valid), 4),
        "samples": samples,
    }
