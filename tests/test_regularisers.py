"""Regularisers: values against hand computation, scheduled weights, skipped terms."""

from __future__ import annotations

import math

import pytest
import torch

from asd3d.regularisers import Regularisers, eikonal_loss, opaqueness_loss, sparsity_loss
from asd3d.types import RenderOutput


def _render(opacity: torch.Tensor, sdf_gradients: torch.Tensor | None = None) -> RenderOutput:
    B, _, H, W = opacity.shape
    return RenderOutput(
        rgb=torch.zeros(B, 3, H, W),
        opacity=opacity,
        depth=torch.zeros_like(opacity),
        sdf_gradients=sdf_gradients,
    )


def test_sparsity_hand_values():
    opacity = torch.tensor([0.0, 1.0, 0.5, 0.2]).view(1, 1, 2, 2)
    expected = (math.sqrt(0.01) + math.sqrt(1.01) + math.sqrt(0.26) + math.sqrt(0.05)) / 4
    assert sparsity_loss(opacity).item() == pytest.approx(expected, rel=1e-6)


def test_opaqueness_is_binary_entropy_clamped():
    def entropy(o):
        return -(o * math.log(o) + (1 - o) * math.log(1 - o))

    opacity = torch.tensor([0.5, 0.0, 1.0, 0.9]).view(2, 1, 1, 2)
    expected = (math.log(2) + 2 * entropy(1e-3) + entropy(0.9)) / 4
    assert opaqueness_loss(opacity).item() == pytest.approx(expected, rel=1e-5)
    opacity = torch.tensor([0.0, 1.0, 0.3]).view(1, 1, 1, 3).requires_grad_()
    opaqueness_loss(opacity).backward()
    assert torch.isfinite(opacity.grad).all() and opacity.grad[..., :2].abs().max() == 0


def test_eikonal_hand_values():
    grads = torch.tensor([[[1.0, 0, 0], [0, 2, 0], [0, 0.6, 0.8], [0, 0, 0]]])
    assert eikonal_loss(grads).item() == pytest.approx((0 + 1 + 0 + 1) / 4)


def test_exact_sphere_sdf_has_zero_eikonal_loss():
    points = torch.randn(2, 1000, 3, dtype=torch.float64, requires_grad=True)
    sdf = points.norm(dim=-1) - 0.5
    (grads,) = torch.autograd.grad(sdf.sum(), points)
    assert eikonal_loss(grads).item() < 1e-12


def test_weighted_terms_and_total_follow_the_schedules():
    opacity = torch.full((2, 1, 3, 3), 0.25)
    grads = torch.tensor([[[0.0, 0, 2]]])
    render = _render(opacity, grads)
    regs = Regularisers(
        sparsity=20.0,
        opaqueness=lambda f: 0.0 if f < 0.8 else 10.0 * (f - 0.8) / 0.2,
        eikonal=lambda f: 100.0 + (1.0 - 100.0) * min(f / 0.1, 1.0),
    )
    sparsity, entropy = math.sqrt(0.0625 + 0.01), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))

    early = regs(render, 0.0)
    assert set(early) == {"sparsity", "eikonal", "total"}  # opaqueness weight 0: not computed
    assert early["sparsity"].item() == pytest.approx(20 * sparsity, rel=1e-6)
    assert early["eikonal"].item() == pytest.approx(100.0)
    assert early["total"].item() == pytest.approx(20 * sparsity + 100.0, rel=1e-6)

    late = regs(render, 0.9)
    assert late["opaqueness"].item() == pytest.approx(5.0 * entropy, rel=1e-5)
    assert late["eikonal"].item() == pytest.approx(1.0)
    assert late["total"].item() == pytest.approx(20 * sparsity + 5 * entropy + 1.0, rel=1e-5)


def test_zero_weights_compute_nothing_and_missing_inputs_are_reported():
    render = _render(torch.rand(1, 1, 2, 2))
    out = Regularisers()(render, 0.5)
    assert set(out) == {"total"} and out["total"].item() == 0.0
    assert set(Regularisers(sparsity=1.0)(render, 0.5)) == {"sparsity", "total"}
    with pytest.raises(ValueError, match="eikonal_points"):
        Regularisers(eikonal=1.0)(render, 0.5)
    with pytest.raises(TypeError, match="sparsity"):
        Regularisers(sparsity="20")


def test_total_is_differentiable():
    opacity = torch.rand(1, 1, 4, 4, requires_grad=True)
    Regularisers(sparsity=20.0, opaqueness=10.0)(_render(opacity), 1.0)["total"].backward()
    assert opacity.grad is not None and opacity.grad.abs().sum() > 0
