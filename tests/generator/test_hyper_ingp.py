"""Hyper-iNGP: release layout of the emitted weights, checkpoint keys, size, background, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from asd3d.cameras import CameraSampler
from asd3d.generator.hyper_ingp import HyperINGPGenerator, release_state_dict_to_hyper_ingp
from asd3d.renderer.background import (
    DirectionalBackground,
    TextConditionedBackground,
    release_state_dict_to_background,
)
from asd3d.renderer.volsdf import VolSDFRenderer

from cli_helpers import train
from generator_testing import (
    build_small_generator,
    generator_overrides,
    make_prompts,
    random_points,
)

CONFIG = Path(__file__).parents[2] / "conf" / "generator" / "hyper_ingp.yaml"

# REFERENCE.md §3: geometry + background + renderer (1 fixed variance) of the release.
RELEASE_PARAMETERS = 13_290_801


def small_background(text_dim: int = 16, spectral_norm: bool = False) -> TextConditionedBackground:
    torch.manual_seed(1)
    background = TextConditionedBackground(
        text_dim, 2, 2, 8, 4, 1.0, 8, 8, 1, spectral_norm=spectral_norm, grid_backend="torch"
    )
    with torch.no_grad():
        background.encoding.params.uniform_(-1.0, 1.0)
    return background


def test_full_size_parameter_count_matches_the_release():
    cfg = OmegaConf.load(CONFIG)
    with torch.device("meta"):
        generator = instantiate(cfg)
        background = TextConditionedBackground(
            cfg.text_dim, 16, 2, 19, 16, 1.0, 64, 64, 1, grid_backend="torch"
        )
    count = sum(p.numel() for m in (generator, background) for p in m.parameters())
    assert generator.encoding.params.numel() == 12_599_920
    assert generator.hypernet.num_outputs == 4352  # 32*64 + 64*1 + 32*64 + 64*3
    assert abs(count + 1 - RELEASE_PARAMETERS) <= 0.02 * RELEASE_PARAMETERS
    assert count + 1 == RELEASE_PARAMETERS  # in fact exact


def test_field_is_the_release_computation():
    """Grid at (x / radius + 1) / 2, then x @ W1 -> relu -> @ W2 with W cut from the flat output."""
    gen = build_small_generator("hyper_ingp")
    prompts = make_prompts(2, 16)
    points = random_points(2, 30, radius=gen.radius)
    out = gen(prompts)(points)
    flat = gen.hypernet.layers(prompts.pooled)
    C, H = gen.encoding.n_output_dims, 8
    sizes = [C * H, H * 1, C * H, H * 3]
    w_sdf1, w_sdf2, w_rgb1, w_rgb2 = flat.split(sizes, dim=1)
    feats = gen.encoding(((points / gen.radius + 1) / 2).reshape(-1, 3)).reshape(2, 30, C)
    sdf = torch.relu(feats @ w_sdf1.reshape(2, C, H)) @ w_sdf2.reshape(2, H, 1)
    rgb = torch.relu(feats @ w_rgb1.reshape(2, C, H)) @ w_rgb2.reshape(2, H, 3)
    torch.testing.assert_close(out.sdf, sdf + points.norm(dim=-1, keepdim=True) - 0.5)
    torch.testing.assert_close(out.rgb, torch.sigmoid(rgb))


def _as_release_checkpoint(gen: HyperINGPGenerator, background: TextConditionedBackground):
    """A Lightning state_dict with the release's key names (threestudio's module tree)."""
    state = {"geometry.bbox": torch.tensor([[-2.0] * 3, [2.0] * 3])}
    state["geometry.encoding.encoding.encoding.params"] = gen.encoding.params.detach()
    for k, v in gen.hypernet.state_dict().items():
        state[f"geometry.hypernet.{k}"] = v
    state["background.encoding.encoding.encoding.params"] = background.encoding.params.detach()
    for k, v in background.hypernet.state_dict().items():
        state[f"background.hypernet.{k}"] = v
    state["renderer.variance._inv_std"] = torch.tensor(0.340119)
    return state


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_release_checkpoint_keys_load_exactly(spectral_norm):
    source = build_small_generator("hyper_ingp", spectral_norm=spectral_norm)
    source_bg = small_background(spectral_norm=spectral_norm)
    state = _as_release_checkpoint(source, source_bg)
    expected = {
        "geometry.hypernet.layers.0.weight",
        "geometry.hypernet.layers.1.weight",
        "geometry.hypernet.layers.1.bias",
        "geometry.hypernet.layers.3.weight",
        "geometry.hypernet.layers.3.bias",
    }
    if spectral_norm:  # torch.nn.utils.spectral_norm's names, as the release saved them
        expected = {k.replace(".weight", ".weight_orig") for k in expected if "layers.1" not in k}
        expected |= {"geometry.hypernet.layers.1.weight", "geometry.hypernet.layers.1.bias"}
    assert expected <= set(state)

    target = build_small_generator("hyper_ingp", spectral_norm=spectral_norm)
    target.load_state_dict(release_state_dict_to_hyper_ingp(state), strict=True)
    target_bg = small_background(spectral_norm=spectral_norm)
    torch.nn.init.zeros_(target_bg.encoding.params)
    target_bg.load_state_dict(release_state_dict_to_background(state), strict=True)
    half = {"geometry.encoding.encoding.encoding.params": torch.zeros(8, dtype=torch.half)}
    assert release_state_dict_to_hyper_ingp(half)["encoding.params"].dtype == torch.float32
    prompts, points = make_prompts(2, 16), random_points(2, 20)
    source.eval(), target.eval()  # spectral norm: no power iteration, same weights
    a, b = source(prompts)(points), target(prompts)(points)
    torch.testing.assert_close(a.rgb, b.rgb, rtol=0, atol=0)
    torch.testing.assert_close(a.sdf, b.sdf, rtol=0, atol=0)
    dirs = torch.nn.functional.normalize(torch.randn(2, 7, 3), dim=-1)
    source_bg.eval(), target_bg.eval()
    torch.testing.assert_close(
        source_bg(dirs, prompts.pooled), target_bg(dirs, prompts.pooled), rtol=0, atol=0
    )


def test_text_conditioned_background_per_prompt():
    background = small_background()
    prompts = make_prompts(2, 16)
    dirs = torch.nn.functional.normalize(torch.randn(2, 5, 4, 3), dim=-1)
    rgb = background(dirs, prompts.pooled)
    assert rgb.shape == (2, 5, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    swapped = background(dirs, prompts.pooled.flip(0))
    assert (rgb - swapped).abs().max() > 1e-3  # each prompt has its own environment
    with pytest.raises(ValueError, match="text_embedding has 1 rows"):
        background(dirs, prompts.pooled[:1])


def test_renderer_feeds_the_fields_text_to_the_background():
    gen = build_small_generator("hyper_ingp")
    renderer = VolSDFRenderer(small_background(), 1.0, 8, 4, beta=1 / 30).train()
    sampler = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180], views_per_prompt=2)
    cams = sampler.sample(2, generator=torch.Generator().manual_seed(0))
    out = renderer(gen(make_prompts(2, 16)), cams, 6, 6, generator=torch.Generator().manual_seed(0))
    out.rgb.mean().backward()
    for name, p in renderer.background.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert gen.hypernet.layers[0].weight.grad.abs().sum() > 0
    # A field without text cannot drive a text-conditioned background: a clear error.
    ingp = build_small_generator("ingp")
    with pytest.raises(ValueError, match="carries no text_embedding"):
        renderer(ingp(make_prompts(2, 16)), cams, 4, 4)
    # ... and a text-conditioned field renders over an unconditional background as well.
    plain = VolSDFRenderer(DirectionalBackground(), 1.0, 8, 4, beta=1 / 30).eval()
    assert plain(gen(make_prompts(2, 16)), cams, 4, 4).rgb.shape == (4, 3, 4, 4)


def test_trains_from_the_command_line(tmp_path):
    result = train(tmp_path / "run", *generator_overrides("hyper_ingp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
