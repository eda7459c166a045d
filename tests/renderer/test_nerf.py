"""NeRF renderer: analytic opacity of a constant-density ball, normals, shading, shared interface."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from asd3d.cameras import camera_rays, orbit_cameras
from asd3d.renderer.background import DirectionalBackground, SolidBackground
from asd3d.renderer.nerf import NeRFRenderer, activate_density
from asd3d.renderer.volsdf import VolSDFRenderer
from asd3d.types import FieldOutput

CONFIG = Path(__file__).parents[2] / "conf" / "renderer" / "nerf.yaml"


class BallDensity(nn.Module):
    """Raw density ``sigma`` inside a ball of radius ``r`` at the origin, ``-1`` outside."""

    def __init__(self, sigma: float = 2.0, radius: float = 0.5) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma))
        self.radius = radius
        self.colour = nn.Parameter(torch.tensor([0.9, 0.4, 0.1]))

    def forward(self, points: torch.Tensor) -> FieldOutput:
        inside = points.norm(dim=-1, keepdim=True) < self.radius
        raw = torch.where(inside, self.sigma.expand_as(inside), torch.full(inside.shape, -1.0))
        return FieldOutput(sdf=raw, rgb=self.colour.expand(*points.shape[:-1], 3))


class SmoothBlob(nn.Module):
    """Raw density ``10 (1 - |x| / 0.5)`` (the iNGP blob): its gradient points inward."""

    def forward(self, points: torch.Tensor) -> FieldOutput:
        raw = 10.0 * (1 - points.norm(dim=-1, keepdim=True) / 0.5)
        return FieldOutput(sdf=raw, rgb=torch.full((*points.shape[:-1], 3), 0.8))


def renderer(**kwargs) -> NeRFRenderer:
    args = dict(
        background=SolidBackground((0.0, 0.0, 0.0)),
        radius=1.0,
        num_samples_stratified=256,
        num_samples_importance=0,
        density_activation="relu",
    )
    return NeRFRenderer(**{**args, **kwargs})


def test_density_activations():
    raw = torch.tensor([-2.0, 0.0, 3.0, 100.0])
    torch.testing.assert_close(activate_density(raw, "relu"), torch.tensor([0.0, 0.0, 3.0, 100.0]))
    softplus = activate_density(raw, "softplus")
    torch.testing.assert_close(softplus[1], torch.tensor(math.log(2.0)))
    torch.testing.assert_close(softplus[3], torch.tensor(100.0))
    torch.testing.assert_close(activate_density(raw[:3], "exp"), raw[:3].exp())
    assert torch.isfinite(activate_density(raw, "exp")).all()
    with pytest.raises(ValueError, match="density_activation='sigmoid'"):
        renderer(density_activation="sigmoid")


def test_constant_density_ball_has_the_analytic_opacity():
    """Opacity ``1 - exp(-sigma L)`` with chord length ``L = 2 sqrt(r^2 - b^2)``."""
    cams = orbit_cameras(2, elevation_deg=10.0, distance=2.0, fovy_deg=50.0)
    H = 17
    with torch.no_grad():
        out = renderer().eval()(BallDensity(), cams, H, H)
    origins, directions = camera_rays(cams, H, H)
    b = torch.linalg.cross(origins, directions, dim=-1).norm(dim=-1)  # ray-to-centre distance
    chord = 2 * (0.25 - b.square()).clamp_min(0).sqrt()
    expected = 1 - torch.exp(-2.0 * chord)
    assert (out.opacity[:, 0] - expected).abs().max() < 0.03  # quadrature at the ball's edge
    centre = out.opacity[:, 0, H // 2, H // 2]
    torch.testing.assert_close(centre, torch.full((2,), 1 - math.exp(-2.0)), atol=5e-3, rtol=0)
    torch.testing.assert_close(
        out.rgb[:, :, H // 2, H // 2],
        (1 - math.exp(-2.0)) * torch.tensor([0.9, 0.4, 0.1]).expand(2, 3),
        atol=5e-3,
        rtol=0,
    )
    assert out.sdf_gradients is None


def test_normals_are_the_negative_density_gradient():
    cams = orbit_cameras(4, elevation_deg=15.0, distance=2.0, fovy_deg=50.0)
    with torch.no_grad():
        out = renderer(density_activation="softplus").eval()(
            SmoothBlob(), cams, 9, 9, compute_normals=True
        )
    centre = nn.functional.normalize(out.normals[:, :, 4, 4], dim=-1)
    torch.testing.assert_close(
        centre, nn.functional.normalize(cams.centers, dim=-1), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("kind", ["nerf", "volsdf"])
def test_diffuse_shading_darkens_grazing_views(kind):
    cams = orbit_cameras(1, elevation_deg=0.0, distance=2.0, fovy_deg=40.0)
    if kind == "nerf":
        field, make = SmoothBlob(), lambda **kw: renderer(density_activation="softplus", **kw)
    else:

        def field(points):
            sdf = points.norm(dim=-1, keepdim=True) - 0.5
            return FieldOutput(sdf=sdf, rgb=torch.full((*points.shape[:-1], 3), 0.8))

        def make(**kw):
            return VolSDFRenderer(SolidBackground((0.0,) * 3), 1.0, 128, 32, 1 / 30, **kw)

    with torch.no_grad():
        flat = make().eval()(field, cams, 15, 15)
        lit = make(shading="diffuse", shading_ambient=0.2).eval()(field, cams, 15, 15)
    assert lit.normals is not None  # shading needs them, so they come back
    # facing the camera: fully lit; the silhouette's rim: close to the ambient term
    torch.testing.assert_close(lit.rgb[0, :, 7, 7], flat.rgb[0, :, 7, 7], atol=1e-2, rtol=0)
    rim = (lit.rgb[0, 0] / flat.rgb[0, 0].clamp_min(1e-6))[flat.opacity[0, 0] > 0.5].min()
    assert rim < 0.6
    with pytest.raises(ValueError, match="shading='phong'"):
        make(shading="phong")


def test_chunked_eval_equals_unchunked_and_gradients_flow():
    field = BallDensity()
    cams = orbit_cameras(2, elevation_deg=20.0, distance=1.8, fovy_deg=60.0, num_prompts=1)
    bg = DirectionalBackground()
    with torch.no_grad():
        whole = renderer(background=bg, num_samples_importance=16, chunk_rays=10**9).eval()(
            field, cams, 8, 7, compute_normals=True
        )
        chunked = renderer(background=bg, num_samples_importance=16, chunk_rays=13).eval()(
            field, cams, 8, 7, compute_normals=True
        )
    for name in ("rgb", "opacity", "depth", "normals"):
        torch.testing.assert_close(getattr(whole, name), getattr(chunked, name), atol=1e-5, rtol=0)
    out = renderer(background=bg).train()(field, cams, 6, 6, generator=torch.Generator())
    out.rgb.mean().backward()
    assert field.sigma.grad.abs() > 0 and field.colour.grad.abs().sum() > 0


def test_release_config_instantiates_and_renders():
    cfg = OmegaConf.load(CONFIG)
    assert cfg.density_activation == "softplus" and cfg.shading == "none"
    cfg.num_samples_stratified, cfg.num_samples_importance = 16, 8
    r = instantiate(cfg)
    assert isinstance(r, NeRFRenderer) and isinstance(r.background, DirectionalBackground)
    cams = orbit_cameras(2, elevation_deg=15.0, distance=1.5, fovy_deg=70.0)
    out = r.train()(SmoothBlob(), cams, 8, 8, generator=torch.Generator().manual_seed(0))
    assert out.rgb.shape == (2, 3, 8, 8) and out.rgb.min() >= 0 and out.rgb.max() <= 1
