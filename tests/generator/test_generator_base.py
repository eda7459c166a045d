"""Shared generator helpers: sphere SDF bias, bias-free MLPs, decoded fields."""

from __future__ import annotations

import torch

from asd3d.generator.base import (
    BiasFreeMLP,
    DecodedField,
    batched_bias_free_mlp,
    sphere_sdf_bias,
)


def test_sphere_sdf_bias_is_signed_distance_to_sphere():
    points = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [0.0, 3.0, 4.0]])
    torch.testing.assert_close(sphere_sdf_bias(points, 0.8), torch.tensor([[-0.8], [0.0], [4.2]]))


def test_bias_free_mlp_layout_matches_threestudio_vanilla_mlp():
    mlp = BiasFreeMLP([32, 64, 3])
    assert [n for n, _ in mlp.named_parameters()] == ["layers.0.weight", "layers.2.weight"]
    assert sum(p.numel() for p in mlp.parameters()) == 32 * 64 + 64 * 3
    assert torch.equal(mlp(torch.zeros(2, 32)), torch.zeros(2, 3))


def test_batched_mlp_equals_per_prompt_modules():
    torch.manual_seed(0)
    mlps = [BiasFreeMLP([4, 8, 8, 2]) for _ in range(3)]
    weights = [torch.stack([m.layers[i].weight for m in mlps]) for i in (0, 2, 4)]
    x = torch.randn(3, 10, 4)
    expected = torch.stack([m(x[i]) for i, m in enumerate(mlps)])
    torch.testing.assert_close(batched_bias_free_mlp(x, weights), expected)


def test_decoded_field_adds_sphere_bias_and_activates_colour():
    field = DecodedField(
        lookup=lambda p: p,
        sdf_decoder=lambda f: f[..., :1] * 0,
        rgb_decoder=lambda f: f,
        sphere_bias_radius=0.5,
    )
    points = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    out = field(points)
    torch.testing.assert_close(out.sdf, torch.tensor([[[0.5], [-0.5]]]))
    torch.testing.assert_close(out.rgb, torch.sigmoid(points))
    no_bias = DecodedField(lambda p: p, lambda f: f[..., :1], lambda f: f, None)(points)
    torch.testing.assert_close(no_bias.sdf, points[..., :1])
