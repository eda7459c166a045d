"""Conformance of every ``conf/generator/*.yaml``: the contract the system and renderer rely on."""

from __future__ import annotations

import pytest
import torch

from asd3d.generator.base import Generator
from asd3d.types import FieldOutput

from generator_testing import (
    PROMPT_SPECIFIC,
    build_small_generator,
    generator_yaml_names,
    make_prompts,
    random_points,
)

NAMES = generator_yaml_names()


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


def test_there_are_generator_configs():
    assert "3dconv" in NAMES


def test_field_shapes_dtypes_and_ranges(name):
    gen = build_small_generator(name)
    assert isinstance(gen, Generator)
    assert gen.text_input in ("pooled", "tokens")
    prompts = make_prompts(3, 16)
    field = gen(prompts, torch.Generator().manual_seed(0))
    out = field(random_points(3, 40))
    assert isinstance(out, FieldOutput)
    assert out.sdf.shape == (3, 40, 1) and out.rgb.shape == (3, 40, 3)
    assert out.sdf.dtype == torch.float32 and out.rgb.dtype == torch.float32
    assert torch.isfinite(out.sdf).all() and torch.isfinite(out.rgb).all()
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1


def test_gradient_reaches_every_trainable_parameter(name):
    gen = build_small_generator(name)
    prompts = make_prompts(2, 16)
    out = gen(prompts, torch.Generator().manual_seed(0))(random_points(2, 500))
    (out.sdf.square().mean() + out.rgb.mean()).backward()
    missing = [
        n
        for n, p in gen.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reaches {missing}"


def test_deterministic_under_seeded_generator(name):
    gen = build_small_generator(name)
    prompts = make_prompts(2, 16)
    points = random_points(2, 64)
    a = gen(prompts, torch.Generator().manual_seed(7))(points)
    b = gen(prompts, torch.Generator().manual_seed(7))(points)
    torch.testing.assert_close(a.sdf, b.sdf, rtol=0, atol=0)
    torch.testing.assert_close(a.rgb, b.rgb, rtol=0, atol=0)


def test_different_texts_give_different_fields(name):
    gen = build_small_generator(name)
    points = random_points(1, 64)
    a = gen(make_prompts(1, 16, seed=1), torch.Generator().manual_seed(0))(points)
    b = gen(make_prompts(1, 16, seed=2), torch.Generator().manual_seed(0))(points)
    if name in PROMPT_SPECIFIC:
        assert torch.equal(a.sdf, b.sdf) and torch.equal(a.rgb, b.rgb)
        return
    assert (a.sdf - b.sdf).abs().max() > 1e-4
    assert (a.rgb - b.rgb).abs().max() > 1e-4


def test_missing_text_embedding_is_a_clear_error(name):
    gen = build_small_generator(name)
    prompts = make_prompts(1, 16)
    stripped = type(prompts)(ids=prompts.ids, texts=prompts.texts)
    if name in PROMPT_SPECIFIC:  # needs no embedding
        assert gen(stripped)(random_points(1, 8)).sdf.shape == (1, 8, 1)
        return
    with pytest.raises(ValueError, match=gen.text_input):
        gen(stripped)
