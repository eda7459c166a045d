"""Distiller math against hand-computed values."""

import pytest
import torch

from asd3d.distiller import math
from asd3d.distiller.timesteps import sample_timestep_shift, sample_timesteps


def test_add_noise_hand_value():
    z, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    abar = torch.full((1, 1, 1, 1), 0.36)
    assert math.add_noise(z, eps, abar).item() == pytest.approx(0.6 * 2.0 + 0.8 * -1.0)


def test_cfg_usual_form():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert math.classifier_free_guidance(cond, uncond, 7.5).item() == pytest.approx(1.0 + 7.5 * 2.0)
    assert math.classifier_free_guidance(cond, uncond, 1.0).item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("kind", "expected"), [("sds", 0.75), ("uniform", 1.0), ("fantasia", 0.5 * 0.75)]
)
def test_timestep_weights(kind, expected):
    assert math.timestep_weight(torch.tensor(0.25), kind).item() == pytest.approx(expected)


def test_unknown_weighting_is_named():
    with pytest.raises(ValueError, match="'bogus'"):
        math.timestep_weight(torch.tensor(0.5), "bogus")


def test_asd_without_shift_is_scaled_csd_direction():
    """With dt = 0, ASD's update is w (s - 1)(eps_c - eps_u), and zero at s = 1."""
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w = torch.tensor([0.3, 0.9]).view(2, 1, 1, 1)
    for s in (1.0, 7.5):
        guided = math.classifier_free_guidance(eps_c, eps_u, s)
        grad = math.asd_gradient(guided, eps_c, w)
        torch.testing.assert_close(grad, w * (s - 1.0) * (eps_c - eps_u))
    assert (
        math.asd_gradient(math.classifier_free_guidance(eps_c, eps_u, 1.0), eps_c, w).abs().max()
        == 0
    )


def test_sds_and_csd_hand_values():
    w = torch.tensor(0.5).view(1, 1, 1, 1)
    one = torch.ones(1, 1, 1, 1)
    assert math.sds_gradient(3 * one, one, w).item() == pytest.approx(1.0)
    assert math.csd_gradient(3 * one, one, w, scale=2.0).item() == pytest.approx(2.0)


def test_surrogate_loss_gradient_is_grad_over_batch():
    z = torch.randn(3, 2, 4, 4, requires_grad=True)
    grad = torch.randn(3, 2, 4, 4)
    math.surrogate_loss(z, grad).backward()
    torch.testing.assert_close(z.grad, grad / 3)


def test_sanitize_gradient_counts_nonfinite_values():
    grad = torch.tensor([float("nan"), float("inf"), -5.0, 0.5])
    sanitized, nonfinite = math.sanitize_gradient(grad, clip=1.0)
    torch.testing.assert_close(sanitized, torch.tensor([0.0, 0.0, -1.0, 0.5]))
    assert int(nonfinite) == 2


def test_sanitize_gradient_is_silent_on_finite_values(recwarn):
    sanitized, nonfinite = math.sanitize_gradient(torch.tensor([3.0, -0.5]), clip=None)
    torch.testing.assert_close(sanitized, torch.tensor([3.0, -0.5]))
    assert int(nonfinite) == 0 and not recwarn.list


def test_timesteps_inclusive_and_grouped():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(500, 4, 20, 23, g, torch.device("cpu"))
    assert t.min() == 20 and t.max() == 23
    assert (t.view(-1, 4) == t.view(-1, 4)[:, :1]).all()
    with pytest.raises(ValueError, match="empty"):
        sample_timesteps(1, 1, 30, 20, g, torch.device("cpu"))


def test_shift_modes():
    t = torch.tensor([520, 980, 999, 20])
    g = torch.Generator().manual_seed(0)
    none = sample_timestep_shift(t, 20, 0.1, "none", 1, 1000, g)
    assert (none == 0).all()
    det = sample_timestep_shift(t, 20, 0.1, "deterministic", 1, 1000, g)
    assert det.tolist() == [50, 19, 0, 0]  # floor(0.1 (t - 20)), clamped so t + dt <= 999
    many = torch.full((10_000,), 520)
    rnd = sample_timestep_shift(many, 20, 0.1, "random", 1, 1000, g)
    assert rnd.min() >= 0 and rnd.max() <= 50 and 22 < rnd.float().mean() < 27
    with pytest.raises(ValueError, match="'sideways'"):
        sample_timestep_shift(t, 20, 0.1, "sideways", 1, 1000, g)
