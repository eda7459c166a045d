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


# ------------------------------------------------------------------ the release's checkpoints
def _release_background_state(seed: int) -> dict[str, torch.Tensor]:
    """``background.*`` of a 3DConv-net / Triplane release checkpoint: threestudio's bias-free
    ``VanillaMLP`` (SH 9 -> 16 -> ReLU -> 16 -> ReLU -> 3), plus keys of other roles."""
    g = torch.Generator().manual_seed(seed)
    return {
        "background.network.layers.0.weight": torch.randn(16, 9, generator=g),
        "background.network.layers.2.weight": torch.randn(16, 16, generator=g),
        "background.network.layers.4.weight": torch.randn(3, 16, generator=g),
        "geometry.sdf_network.layers.0.weight": torch.randn(64, 32, generator=g),
        "geometry.bbox": torch.zeros(2, 3),
        "renderer.variance._inv_std": torch.tensor(0.340119),
    }


def _release_background_colour(state, directions, activation) -> torch.Tensor:
    """The release's forward, written out: tiny-cuda-nn's SH (degree 3 = 9 terms) of the unit
    direction, the MLP on the layer weights, then the colour activation."""
    d = torch.nn.functional.normalize(directions, dim=-1)
    x, y, z = d.unbind(-1)
    sh = torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y,
            0.48860251190291987 * z,
            -0.48860251190291987 * x,
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.94617469575755997 * z * z - 0.31539156525251999,
            -1.0925484305920792 * x * z,
            0.54627421529603959 * (x * x - y * y),
        ],
        dim=-1,
    )
    w0, w2, w4 = (state[f"background.network.layers.{i}.weight"] for i in (0, 2, 4))
    h = torch.relu(torch.relu(sh @ w0.T) @ w2.T) @ w4.T
    if activation == "sigmoid-mipnerf":
        return torch.sigmoid(h) * 1.002 - 0.001
    return torch.sigmoid(h)


@pytest.mark.parametrize(
    ("experiment", "release_activation"),
    [("df415_3dconv_sd", "sigmoid"), ("dl17k_triplane_mvdream", "sigmoid-mipnerf")],
)
def test_release_background_loads_into_the_experiments_background(
    tmp_path, experiment, release_activation
):
    from hydra.utils import instantiate

    from asd3d.build import compose_train_config
    from asd3d.renderer.background import release_state_dict_to_directional_background

    cfg = compose_train_config([f"experiment={experiment}"], tmp_path)
    background = instantiate(cfg.renderer.background)
    assert isinstance(background, DirectionalBackground)
    state = _release_background_state(seed=1)
    mapped = release_state_dict_to_directional_background(state)
    assert set(mapped) == {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"}
    background.load_state_dict(mapped, strict=True)
    directions = torch.randn(4, 5, 3)
    torch.testing.assert_close(
        background(directions),
        _release_background_colour(state, directions, release_activation),
        rtol=1e-5,
        atol=1e-6,
    )


def test_mipnerf_colour_reaches_beyond_zero_and_one():
    bg = DirectionalBackground(colour_activation="sigmoid_mipnerf")
    for layer in bg.mlp:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.constant_(layer.weight, 1.0e3)
    assert (bg(torch.tensor([[0.0, 0.0, 1.0]])) > 1.0).all()
    with pytest.raises(ValueError, match="colour_activation='relu'"):
        DirectionalBackground(colour_activation="relu")
