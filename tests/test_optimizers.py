"""The `optimizer` group: Adam (default) and Adan select, build and step inside the system."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hydra.utils import instantiate
from timm.optim import Adan

from asd3d.build import build_system

from conftest import TINY, compose_train


@pytest.mark.parametrize(
    ("choice", "cls", "betas"),
    [("adam", torch.optim.Adam, (0.0, 0.99)), ("adan", Adan, (0.98, 0.92, 0.99))],
)
def test_optimizer_group_builds_and_steps_in_the_system(tmp_path, choice, cls, betas):
    cfg = compose_train([*TINY, f"optimizer={choice}"], tmp_path / "run")
    system = build_system(cfg, {})
    optimizer = system.configure_optimizers()
    assert type(optimizer) is cls
    names = [group["name"] for group in optimizer.param_groups]
    assert names == ["generator", "renderer"]
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [cfg.system.lr_generator, cfg.system.lr_renderer]
    assert all(tuple(group["betas"]) == betas for group in optimizer.param_groups)
    if choice == "adan":
        assert all(group["eps"] == 1e-15 for group in optimizer.param_groups)

    param = next(system.generator.parameters())
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert not torch.equal(param.detach(), before)
    # Checkpoints hold the optimizer state; safe loading must accept it (plain betas, no ListConfig).
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_adan_betas_are_moving_average_decay_rates():
    """timm's Adan uses threestudio's (and the official Adan code's) convention: each beta is the
    decay rate of a moving average (``m <- b1 m + (1 - b1) g``), the paper's ``1 - beta_k``.
    Checked against the closed form of the first two updates (no weight decay)."""
    b1, b2, b3 = 0.98, 0.92, 0.99
    lr = 0.1
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = Adan([param], lr=lr, betas=(b1, b2, b3), eps=1e-15)
    param.grad = torch.tensor([0.5, -3.0])
    optimizer.step()
    # Step 1: after bias correction m = g, n = g^2, and the gradient difference is 0 (the
    # previous gradient is initialised to g), so the step is lr * m / sqrt(n) = lr * sign(g).
    torch.testing.assert_close(param.detach(), torch.tensor([1.0 - lr, -2.0 + lr]))
    # Step 2: bias-corrected averages of g, of g2 - g1 and of (g2 + b2 (g2 - g1))^2.
    g1, g2 = torch.tensor([0.5, -3.0]), torch.tensor([1.5, -1.0])
    param.grad = g2.clone()
    start = param.detach().clone()
    optimizer.step()
    m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1**2)
    diff = ((1 - b2) * (g2 - g1)) / (1 - b2**2)
    n = (b3 * (1 - b3) * g1**2 + (1 - b3) * (g2 + b2 * (g2 - g1)) ** 2) / (1 - b3**2)
    expected = start - lr * (m + b2 * diff) / n.sqrt()
    torch.testing.assert_close(param.detach(), expected)


def test_adan_yaml_matches_the_release_recipe(tmp_path):
    cfg = compose_train([*TINY, "optimizer=adan"], tmp_path / "run")
    assert cfg.system.optimizer._target_ == "timm.optim.Adan"
    factory = instantiate(cfg.system.optimizer)
    optimizer = factory([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    group = optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.98, 0.92, 0.99)
    assert group["eps"] == 1e-15 and group["weight_decay"] == 0.0 and not group["no_prox"]
    assert math.isclose(group["lr"], 2e-4)


def test_default_optimizer_is_the_releases_adam(tmp_path):
    cfg = compose_train([], tmp_path / "run")
    assert cfg.system.optimizer._target_ == "torch.optim.Adam"
    assert list(cfg.system.optimizer.betas) == [0.0, 0.99]
