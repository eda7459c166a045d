"""Backgrounds: the SH encoding is an orthonormal basis; modules map directions to [0, 1]."""

from __future__ import annotations

import math

import pytest
import torch

from asd3d.renderer.background import DirectionalBackground, SolidBackground, spherical_harmonics


def _fibonacci_sphere(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_are_orthonormal(degree):
    d = _fibonacci_sphere(20000)
    Y = spherical_harmonics(d, degree)
    assert Y.shape == (20000, (degree + 1) ** 2)
    gram = Y.T @ Y * (4 * math.pi / len(d))  # quadrature of the integral over the sphere
    assert torch.allclose(gram, torch.eye(Y.shape[1], dtype=torch.float64), atol=2e-3)


def test_spherical_harmonics_hand_values():
    Y = spherical_harmonics(torch.tensor([[0.0, 0.0, 1.0]]), 2)[0]
    c0, c1 = 0.5 / math.sqrt(math.pi), math.sqrt(3 / (4 * math.pi))
    expected = [c0, 0.0, c1, 0.0, 0.0, 0.0, math.sqrt(5 / (16 * math.pi)) * 2, 0.0, 0.0]
    assert torch.allclose(Y, torch.tensor(expected), atol=1e-6)


def test_directional_background_shapes_range_and_gradients():
    torch.manual_seed(0)
    bg = DirectionalBackground(sh_degree=3, hidden_features=8, num_hidden_layers=1, bias=True)
    directions = torch.randn(2, 5, 7, 3)
    out = bg(directions)
    assert out.shape == (2, 5, 7, 3) and (out > 0).all() and (out < 1).all()
    assert torch.allclose(out, bg(3.0 * directions), atol=1e-6)  # only the direction matters
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg.parameters())
    assert sum(p.numel() for p in DirectionalBackground().parameters()) == 9 * 16 + 16 * 16 + 16 * 3


def test_solid_background():
    bg = SolidBackground((0.25, 0.5, 1.0))
    assert list(bg.parameters()) == [] and bg.state_dict() == {}
    assert torch.equal(bg(torch.randn(4, 2, 3)), torch.tensor([0.25, 0.5, 1.0]).expand(4, 2, 3))
    with pytest.raises(ValueError, match="rgb"):
        SolidBackground((1.0, 2.0, 0.0))


def test_rejects_unsupported_degree():
    with pytest.raises(ValueError, match="sh_degree"):
        DirectionalBackground(sh_degree=4)
