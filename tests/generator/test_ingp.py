"""iNGP prompt-specific generator: release size, blob / sphere initial shapes, NeRF rendering, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from asd3d.cameras import orbit_cameras
from asd3d.generator.ingp import INGPGenerator
from asd3d.renderer.background import SolidBackground
from asd3d.renderer.nerf import NeRFRenderer

from cli_helpers import train
from generator_testing import (
    build_small_generator,
    generator_overrides,
    make_prompts,
    random_points,
)

CONFIG = Path(__file__).parents[2] / "conf" / "generator" / "ingp.yaml"


def test_full_size_parameter_count():
    with torch.device("meta"):
        generator = instantiate(OmegaConf.load(CONFIG))
    # release (threestudio implicit-volume): 12,599,920 grid + 32*64 + 64 + 32*64 + 64*3 MLPs
    assert sum(p.numel() for p in generator.parameters()) == 12_599_920 + 4352


def _zero_decoders(gen):
    with torch.no_grad():
        for p in (*gen.density_network.parameters(), *gen.feature_network.parameters()):
            p.zero_()


def test_density_output_is_raw_mlp_plus_magic3d_blob():
    gen = build_small_generator("ingp")
    _zero_decoders(gen)
    points = random_points(1, 50, radius=1.0)
    out = gen(make_prompts(1, 16))(points)
    torch.testing.assert_close(out.sdf, 10.0 * (1 - points.norm(dim=-1, keepdim=True) / 0.5))
    torch.testing.assert_close(out.rgb, torch.full_like(out.rgb, 0.5))


def test_sdf_output_uses_the_sphere_bias():
    gen = build_small_generator("ingp", output="sdf", sphere_bias_radius=0.3)
    _zero_decoders(gen)
    points = random_points(1, 50, radius=1.0)
    out = gen(make_prompts(1, 16))(points)
    torch.testing.assert_close(out.sdf, points.norm(dim=-1, keepdim=True) - 0.3)
    with pytest.raises(ValueError, match="output='nerf'"):
        INGPGenerator(2, 2, 6, 4, 2.0, 8, output="nerf")


def test_every_prompt_gets_the_one_field():
    gen = build_small_generator("ingp")
    points = random_points(1, 40, radius=1.0).expand(3, -1, -1)
    out = gen(make_prompts(3, 16))(points)
    assert torch.equal(out.sdf[0], out.sdf[2]) and torch.equal(out.rgb[0], out.rgb[1])


def test_initial_blob_renders_as_an_opaque_ball():
    gen = build_small_generator("ingp")
    renderer = NeRFRenderer(SolidBackground((1.0, 1.0, 1.0)), 1.0, 64, 32).eval()
    cams = orbit_cameras(2, elevation_deg=15.0, distance=1.5, fovy_deg=70.0)
    with torch.no_grad():
        out = renderer(gen(make_prompts(1, 16)), cams, 16, 16)
    # softplus(10 (1 - |x| / 0.5)) ~ 10 inside: the ball |x| < 0.5 is opaque, corners are empty
    assert out.opacity[:, 0, 8, 8].min() > 0.99 and out.opacity[:, 0, 0, 0].max() < 0.05


def test_trains_from_the_command_line(tmp_path):
    result = train(tmp_path / "run", *generator_overrides("ingp", renderer="nerf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
