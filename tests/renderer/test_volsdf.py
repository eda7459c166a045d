"""VolSDF renderer: box clipping, analytic sphere renders, gradients, chunking, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from asd3d.cameras import CameraSampler, camera_rays, orbit_cameras
from asd3d.regularisers import eikonal_loss
from asd3d.renderer.background import DirectionalBackground, SolidBackground
from asd3d.renderer.volsdf import VolSDFRenderer, laplace_density, ray_box_intersection
from asd3d.types import Cameras, FieldOutput

BETA = 1 / 30
CONFIG = Path(__file__).parents[2] / "conf" / "renderer" / "volsdf.yaml"


class SphereField(nn.Module):
    """Per-prompt spheres at the origin: ``sdf = scale (|x| - radius_p)``, learnable colour."""

    def __init__(self, radii=(0.5,), scale: float = 1.0) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(radii)[:, None, None])
        self.scale = nn.Parameter(torch.tensor(scale))
        self.colour = nn.Parameter(torch.tensor([0.2, 0.5, 0.8]))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, points: torch.Tensor) -> FieldOutput:
        self.calls.append(tuple(points.shape))
        sdf = self.scale * (points.norm(dim=-1, keepdim=True) - self.radius)
        return FieldOutput(sdf=sdf, rgb=self.colour.expand(*points.shape[:-1], 3))


def renderer(**kwargs) -> VolSDFRenderer:
    args = dict(
        background=SolidBackground((0.0, 0.0, 0.0)),
        radius=1.0,
        num_samples_stratified=64,
        num_samples_importance=32,
        beta=BETA,
    )
    return VolSDFRenderer(**{**args, **kwargs})


def sd_cameras(num_prompts: int, seed: int = 0, views: int = 1) -> Cameras:
    sampler = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180], views_per_prompt=views)
    return sampler.sample(num_prompts, generator=torch.Generator().manual_seed(seed))


def test_ray_box_intersection_hand_values():
    s = 1 / math.sqrt(2)
    origins = torch.tensor(
        [[2.0, 0, 0], [0, 0, 0], [-2, -2, 0], [2, 2, 0], [0, 2, 0], [2, 0, 0], [0.5, 0.2, -3]]
    )
    directions = torch.tensor(
        [[-1.0, 0, 0], [1, 0, 0], [s, s, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1]]
    )
    near, far, hit = ray_box_intersection(origins, directions, radius=1.0, near_min=0.05)
    assert hit.tolist() == [True, True, True, False, False, False, True]
    expected_near = torch.tensor([1.0, 0.05, math.sqrt(2), 0, 0, 0, 2.0])
    expected_far = torch.tensor([3.0, 1.0, 3 * math.sqrt(2), 0, 0, 0, 4.0])
    assert torch.allclose(near[hit], expected_near[hit], atol=1e-6)
    assert torch.allclose(far[hit], expected_far[hit], atol=1e-6)
    assert torch.equal(far[~hit], near[~hit])  # empty span: zero opacity


def test_laplace_density_values():
    sdf = torch.tensor([0.0, 0.1, -0.1, 100.0, -100.0])
    expected = (
        torch.tensor(
            [
                0.5,
                0.5 * math.exp(-3),
                1 - 0.5 * math.exp(-3),
                0.5 * math.exp(-60),
                1 - 0.5 * math.exp(-60),
            ]
        )
        / BETA
    )
    assert torch.allclose(laplace_density(sdf, BETA), expected, rtol=1e-5)
    assert (
        laplace_density(sdf, BETA).abs() >= torch.finfo(torch.float32).tiny
    ).all()  # no denormals


def _reference_opacity(origins, directions, radius, steps=4000):
    """Opacity of each ray by brute-force integration of the density (float64)."""
    o, d = origins.double().reshape(-1, 3), directions.double().reshape(-1, 3)
    near, far, _ = ray_box_intersection(o, d, 1.0, 0.05)
    s = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    t = near[:, None] + (far - near)[:, None] * s
    sdf = (o[:, None] + d[:, None] * t[..., None]).norm(dim=-1) - radius
    optical = (laplace_density(sdf, BETA) * ((far - near) / steps)[:, None]).sum(-1)
    return (1 - torch.exp(-optical)).reshape(origins.shape[:-1])


def test_sphere_silhouette_opacity_and_depth():
    cams = orbit_cameras(2, elevation_deg=20.0, distance=2.0, fovy_deg=60.0)
    H = 33
    with torch.no_grad():
        out = renderer().eval()(SphereField(), cams, H, H)
    assert out.rgb.shape == (2, 3, H, H) and out.opacity.shape == out.depth.shape == (2, 1, H, H)
    origins, directions = camera_rays(cams, H, H)
    closest = torch.linalg.cross(origins, directions, dim=-1).norm(dim=-1)  # ray-to-centre distance
    opacity = out.opacity[:, 0]
    assert opacity[closest < 0.45].min() > 0.999  # inside the projected silhouette
    assert opacity[closest > 0.75].max() < 0.01  # outside it (the Laplace tail reaches ~7 beta)
    # The soft edge is exactly what the VolSDF density integrates to along each ray.
    reference = _reference_opacity(origins, directions, 0.5).float()
    assert (opacity - reference).abs().max() < 0.02
    # Expected termination distance at the centre: d - r plus the Laplace ramp's offset
    # beta * (sum_k (-1/2)^k / (k k!) + 2 (1 - e^-1/2)) = 0.3431 beta for a surface hit head-on.
    centre = out.depth[:, 0, H // 2, H // 2]
    assert torch.allclose(centre, torch.full((2,), 1.5 + 0.3431 * BETA), atol=2e-3)
    assert torch.allclose(
        out.rgb[:, :, H // 2, H // 2], torch.tensor([0.2, 0.5, 0.8]).expand(2, 3), atol=1e-4
    )


def test_normals_face_the_camera():
    cams = orbit_cameras(4, elevation_deg=15.0, distance=2.0, fovy_deg=50.0)
    with torch.no_grad():
        out = renderer().eval()(SphereField(), cams, 9, 9, compute_normals=True)
    centre = out.normals[:, :, 4, 4]
    assert torch.allclose(centre, torch.nn.functional.normalize(cams.centers, dim=-1), atol=2e-3)
    assert out.normals[:, :, 0, 0].abs().max() < 1e-3  # empty pixel


def test_field_called_once_per_prompt_group_with_all_views():
    field = SphereField(radii=(0.3, 0.6))
    cams = sd_cameras(2, views=3)
    out = renderer().train()(field, cams, 4, 5, generator=torch.Generator().manual_seed(0))
    assert field.calls == [(2, 3 * 4 * 5 * 64, 3), (2, 3 * 4 * 5 * 32, 3)]
    # views 0-2 show the small sphere, views 3-5 the large one
    small, large = out.opacity.view(2, 3, -1).mean(-1)
    assert (small < large).all()


def test_gradients_reach_the_field_parameters():
    field = SphereField()
    out = renderer().train()(
        field, sd_cameras(2), 16, 16, generator=torch.Generator().manual_seed(0)
    )
    (out.rgb * torch.rand_like(out.rgb)).mean().backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_chunked_eval_render_equals_unchunked():
    field = SphereField(radii=(0.4, 0.55))
    cams = sd_cameras(2, seed=1, views=2)
    bg = DirectionalBackground()
    with torch.no_grad():
        whole = renderer(background=bg, chunk_rays=10**9).eval()(
            field, cams, 12, 10, compute_normals=True
        )
        field.calls.clear()
        chunked = renderer(background=bg, chunk_rays=37).eval()(
            field, cams, 12, 10, compute_normals=True
        )
    for name in ("rgb", "opacity", "depth", "normals"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-5), name
    assert max(n for _, n, _ in field.calls) <= (37 // 2) * 96 * 6  # chunks of 18 rays per prompt


def test_eval_render_is_deterministic_and_training_jitter_is_seeded():
    r, field, cams = renderer(), SphereField(), sd_cameras(2)
    with torch.no_grad():
        a, b = r.eval()(field, cams, 8, 8), r(field, cams, 8, 8)
    assert torch.equal(a.rgb, b.rgb)
    r.train()
    c = r(field, cams, 8, 8, generator=torch.Generator().manual_seed(5))
    d = r(field, cams, 8, 8, generator=torch.Generator().manual_seed(5))
    e = r(field, cams, 8, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c.rgb, d.rgb) and not torch.equal(c.rgb, e.rgb)


def test_background_augmentation_is_seeded_and_per_image():
    empty = SphereField(radii=(-1.0,))  # no surface: every pixel shows the background
    cams = sd_cameras(1, views=6)
    r = renderer(background=DirectionalBackground(), background_augmentation_prob=0.5).train()

    def render(seed):
        return r(empty, cams, 6, 6, generator=torch.Generator().manual_seed(seed)).rgb

    first, again = render(0), render(0)
    assert torch.equal(first, again)
    assert not torch.equal(first, render(1))
    assert first.max() <= 1 and first.min() >= 0
    with torch.no_grad():  # no augmentation in eval
        plain = r.eval()(empty, cams, 6, 6).rgb
    assert torch.allclose(plain, r.background(camera_rays(cams, 6, 6)[1]).permute(0, 3, 1, 2))
    replaced = (first - plain).flatten(1).abs().amax(-1) > 1e-4
    assert 0 < replaced.sum() < 6
    assert (first[replaced].flatten(2).std(-1) < 1e-6).all()  # a solid colour per image
    always = (
        renderer(background_augmentation_prob=1.0)
        .train()(empty, cams, 6, 6, generator=torch.Generator().manual_seed(0))
        .rgb.flatten(2)
    )
    assert (always.std(-1) < 1e-6).all() and always[:, :, 0].std(0).min() > 0  # distinct colours


def test_background_override_and_missed_rays():
    cams = orbit_cameras(2, elevation_deg=0.0, distance=5.0, fovy_deg=5.0)
    away = Cameras(
        c2w=cams.c2w.clone(),
        fovy=cams.fovy,
        elevation=cams.elevation,
        azimuth=cams.azimuth,
        distance=cams.distance,
    )
    away.c2w[:, :3, 2] *= -1  # look away from the box (mirrored basis, fine for this test)
    away.c2w[:, :3, 0] *= -1
    white = torch.ones(2, 3)
    out = renderer().eval()(SphereField(radii=(0.9,)), away, 4, 4, background_rgb=white)
    assert out.opacity.abs().max() == 0 and torch.equal(out.rgb, torch.ones(2, 3, 4, 4))
    hit = renderer().eval()(SphereField(radii=(0.9,)), cams, 4, 4, background_rgb=white)
    assert hit.opacity.min() > 0.999  # a narrow fov at distance 5 sees only the sphere
    with pytest.raises(ValueError, match="background_rgb"):
        renderer()(SphereField(), cams, 4, 4, background_rgb=torch.ones(3))


def test_sdf_gradients_for_the_eikonal_loss():
    field = SphereField(scale=1.0)
    r = renderer(eikonal_points=500).train()
    out = r(field, sd_cameras(1), 4, 4, generator=torch.Generator().manual_seed(0))
    assert out.sdf_gradients.shape == (1, 500, 3)
    assert eikonal_loss(out.sdf_gradients) < 1e-4  # an exact SDF
    field.scale.data.fill_(2.0)
    out = r(field, sd_cameras(1), 4, 4, generator=torch.Generator().manual_seed(0))
    loss = eikonal_loss(out.sdf_gradients)
    assert loss.item() == pytest.approx(1.0, rel=1e-3)  # |grad| = 2 everywhere
    loss.backward()
    assert field.scale.grad.item() == pytest.approx(2.0, rel=1e-3)  # d/ds (s - 1)^2 at s = 2
    with torch.no_grad():
        assert r.eval()(field, sd_cameras(1), 4, 4).sdf_gradients is None


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="beta"):
        renderer(beta=0.0)
    with pytest.raises(ValueError, match="background_augmentation_prob"):
        renderer(background_augmentation_prob=1.5)


def test_release_config_instantiates_and_renders():
    cfg = OmegaConf.load(CONFIG)
    assert cfg.num_samples_stratified == 128 and cfg.num_samples_importance == 64
    assert cfg.beta == pytest.approx(1 / 30) and cfg.background_augmentation_prob == 0.5
    cfg.num_samples_stratified, cfg.num_samples_importance = 16, 8
    r = instantiate(cfg)
    assert isinstance(r, VolSDFRenderer) and isinstance(r.background, DirectionalBackground)
    out = r.train()(SphereField(), sd_cameras(2), 8, 8, generator=torch.Generator().manual_seed(0))
    assert out.rgb.shape == (2, 3, 8, 8) and out.sdf_gradients.shape == (2, cfg.eikonal_points, 3)
