"""The procedural prior is the exact denoiser it claims to be (DESIGN.md §3)."""

import pytest
import torch
from hydra.utils import instantiate

from asd3d.build import build_parts
from asd3d.cameras import CameraSampler
from asd3d.prior.schedule import gather_abar
from asd3d.types import PromptBatch

from conftest import TINY, compose_train


@pytest.fixture
def world(tmp_path):
    cfg = compose_train([*TINY, "corpus.num_prompts=8"], tmp_path / "run")
    return cfg, build_parts(cfg)


def noisy(prior, texts, cameras, t, eps, image=None):
    if image is None:
        image = prior.render_ground_truth(list(texts), cameras)
    z = prior.encode_images(image)
    abar = gather_abar(prior.alphas_cumprod, t)
    return abar.sqrt() * z + (1 - abar).sqrt() * eps


def setup_batch(parts, prompts, views=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cams = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(
        len(prompts), generator=g
    )
    batch = PromptBatch(ids=torch.arange(len(prompts)), texts=tuple(prompts))
    return cams, parts.prior.condition(batch, cams)


def test_conditional_branch_recovers_the_noise_when_data_spread_vanishes(world):
    cfg, parts = world
    prior = parts.prior
    prior.data_std = 1e-4
    texts = [parts.corpus.prompt("train", i) for i in range(3)]
    cams, conditions = setup_batch(parts, texts)
    t = torch.tensor([50, 400, 900])
    eps = torch.randn(
        3, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(1)
    )
    x_t = noisy(prior, texts, cams, t, eps)
    torch.testing.assert_close(
        prior.predict_eps(x_t, t, conditions.positive), eps, atol=2e-3, rtol=0
    )


def test_unconditional_branch_is_the_mixture_denoiser(world):
    cfg, parts = world
    prior = parts.prior
    texts = [parts.corpus.prompt("train", 0)]
    cams, conditions = setup_batch(parts, texts)
    eps = torch.randn(
        1, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(2)
    )
    # Near its own scene at small t, the mixture's posterior picks the own scene: guidance vanishes.
    t = torch.tensor([30])
    x_t = noisy(prior, texts, cams, t, eps)
    cond = prior.predict_eps(x_t, t, conditions.positive)
    uncond = prior.predict_eps(x_t, t, conditions.negative)
    torch.testing.assert_close(uncond, cond, atol=1e-4, rtol=0)
    # Built from another scene's image, the unconditional prediction points elsewhere.
    other = prior.render_ground_truth([parts.corpus.prompt("train", 1)], cams)
    x_other = noisy(prior, texts, cams, t, eps, image=other)
    gap = prior.predict_eps(x_other, t, conditions.positive) - prior.predict_eps(
        x_other, t, conditions.negative
    )
    assert gap.abs().mean() > 0.05
    # With a single-component mixture, unconditional = conditional everywhere.
    prior.mixture_size = 1
    torch.testing.assert_close(
        prior.predict_eps(x_other, t, conditions.negative),
        prior.predict_eps(x_other, t, conditions.positive),
    )


def test_rows_are_independent_and_deterministic(world):
    cfg, parts = world
    prior = parts.prior
    texts = [parts.corpus.prompt("train", i) for i in range(2)]
    cams, conditions = setup_batch(parts, texts)
    x = torch.randn(
        2, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(3)
    )
    t = torch.tensor([700, 100])
    both = prior.predict_eps(x, t, conditions.negative)
    single = prior.predict_eps(x[1:], t[1:], conditions.negative.index(torch.tensor([1])))
    torch.testing.assert_close(both[1:], single)
    torch.testing.assert_close(both, prior.predict_eps(x, t, conditions.negative))


def test_encode_images_is_differentiable_and_prior_frozen(world):
    cfg, parts = world
    rgb = torch.rand(2, 3, 20, 20, requires_grad=True)
    z = parts.prior.encode_images(rgb)
    assert z.shape == (2, 3, parts.prior.resolution, parts.prior.resolution)
    z.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in parts.prior.parameters())


def test_procedural_prior_refuses_a_prompt_library(world, shared_corpora):
    cfg, parts = world
    from asd3d.corpus.prompt_library import PromptLibraryCorpus

    corpus = PromptLibraryCorpus(shared_corpora / "magic3d_15_prompt_library.json")
    with pytest.raises(Exception, match="corpus=procedural"):
        instantiate(cfg.prior, corpus=corpus)


def test_several_scenes_per_prompt_give_a_mixture_over_the_prompts_own_scenes(tmp_path):
    """With ground_truth.variants = 3 the conditional branch is the exact denoiser of the
    mixture over the prompt's three scenes: near any one of them at small t it recovers that
    scene's noise, and far from all of them it points between them."""
    cfg = compose_train(
        [*TINY, "corpus.num_prompts=8", "+ground_truth.variants=3"], tmp_path / "run"
    )
    parts = build_parts(cfg)
    prior = parts.prior
    prior.data_std = 1e-4
    text = "a small red cube to the left of a large blue sphere"
    cams, conditions = setup_batch(parts, [text])
    t = torch.tensor([30])
    eps = torch.randn(1, 3, prior.resolution, prior.resolution, generator=torch.Generator())
    for variant in range(3):
        image = prior.render_ground_truth([text], cams, [variant])
        x_t = noisy(prior, [text], cams, t, eps, image=image)
        torch.testing.assert_close(
            prior.predict_eps(x_t, t, conditions.positive), eps, atol=2e-3, rtol=0
        )
    scenes = torch.cat([prior.render_ground_truth([text], cams, [k]) for k in range(3)])
    assert (scenes[1:] - scenes[0]).abs().amax() > 0.3  # the scenes differ visibly
