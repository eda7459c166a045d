"""Cameras: look-at matrices, pixel-centre rays, training samplers and evaluation orbits."""

from __future__ import annotations

import math

import pytest
import torch

from asd3d.cameras import (
    CameraSampler,
    camera_rays,
    look_at,
    orbit_cameras,
    plucker_rays,
    ray_points_nearest_origin,
)
from asd3d.types import Cameras

SD = dict(
    distance_range=[1.0, 1.5],
    fovy_range_deg=[40, 70],
    elevation_range_deg=[-10, 45],
    azimuth_range_deg=[-180, 180],
)
MVDREAM = dict(
    distance_range=[0.8, 1.0],
    fovy_range_deg=[15, 60],
    elevation_range_deg=[0, 30],
    azimuth_range_deg=[-180, 180],
    views_per_prompt=4,
    view_layout="orbit",
    distance_mode="fov_scaled",
)


def _camera(elevation_deg: float, azimuth_deg: float, distance: float, fovy_deg: float) -> Cameras:
    el, az = torch.tensor([math.radians(elevation_deg)]), torch.tensor([math.radians(azimuth_deg)])
    center = distance * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    return Cameras(
        c2w=look_at(center),
        fovy=torch.tensor([math.radians(fovy_deg)]),
        elevation=el,
        azimuth=az,
        distance=torch.tensor([distance]),
    )


def test_look_at_is_a_rotation_looking_at_the_target():
    centers = torch.tensor([[2.0, 0.0, 0.0], [0.3, -1.0, 0.7], [0.0, 0.0, 3.0], [0.0, 0.0, -1.0]])
    c2w = look_at(centers)
    R = c2w[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(4, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4), atol=1e-6)
    # OpenGL: the camera looks down its local -z, i.e. its +z axis points away from the target.
    assert torch.allclose(R[:, :, 2], torch.nn.functional.normalize(centers, dim=-1), atol=1e-6)
    assert torch.equal(c2w[:, :3, 3], centers)
    assert torch.equal(c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(4, 4))
    # world +z up: a camera on +x has image-up = +z and image-right = +y
    assert torch.allclose(R[0, :, 1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(R[0, :, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_rays_go_through_pixel_centres():
    cam = _camera(20.0, 30.0, 2.0, 90.0)  # fovy 90 on 4 rows: focal = 2 pixels
    origins, directions = camera_rays(cam, 4, 6)
    assert origins.shape == directions.shape == (1, 4, 6, 3)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(1, 4, 6))
    assert torch.allclose(origins, cam.centers[:, None, None, :].expand(1, 4, 6, 3))
    local = torch.einsum("ji,hwj->hwi", cam.c2w[0, :3, :3], directions[0])  # world -> camera
    x_over_z = local[..., 0] / -local[..., 2]
    y_over_z = local[..., 1] / -local[..., 2]
    cols = (torch.arange(6) + 0.5 - 3.0) / 2.0
    rows = -(torch.arange(4) + 0.5 - 2.0) / 2.0  # row 0 is the top of the image
    assert torch.allclose(x_over_z, cols[None, :].expand(4, 6), atol=1e-6)
    assert torch.allclose(y_over_z, rows[:, None].expand(4, 6), atol=1e-6)


def test_principal_ray_goes_to_the_origin_and_the_image_is_upright():
    cam = _camera(0.0, 0.0, 3.0, 50.0)
    origins, directions = camera_rays(cam, 5, 7)
    assert torch.allclose(directions[0, 2, 3], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    assert directions[0, 0, 3, 2] > 0 > directions[0, -1, 3, 2]  # top row looks up (+z)
    assert directions[0, 2, -1, 1] > 0 > directions[0, 2, 0, 1]  # right column sees +y


def test_sd_sampler_respects_ranges_and_is_deterministic():
    sampler = CameraSampler(**SD)
    cams = sampler.sample(500, generator=torch.Generator().manual_seed(0))
    assert len(cams) == 500 and cams.views_per_prompt == 1
    deg = torch.rad2deg
    assert cams.distance.min() >= 1.0 and cams.distance.max() <= 1.5
    assert deg(cams.fovy).min() >= 40 and deg(cams.fovy).max() <= 70
    assert deg(cams.elevation).min() >= -10 and deg(cams.elevation).max() <= 45
    assert deg(cams.azimuth).min() >= -180 and deg(cams.azimuth).max() <= 180
    assert deg(cams.azimuth).max() - deg(cams.azimuth).min() > 300  # actually spread
    assert torch.allclose(cams.centers.norm(dim=-1), cams.distance, atol=1e-5)
    assert torch.allclose(torch.asin(cams.centers[:, 2] / cams.distance), cams.elevation, atol=1e-4)
    again = sampler.sample(500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cams.c2w, again.c2w)
    other = sampler.sample(500, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(cams.c2w, other.c2w)


def test_orbit_layout_shares_parameters_and_spaces_views_90_degrees():
    cams = CameraSampler(**MVDREAM).sample(6, generator=torch.Generator().manual_seed(3))
    assert len(cams) == 24 and cams.views_per_prompt == 4 and cams.num_prompts == 6
    for name in ("elevation", "fovy", "distance"):
        grouped = getattr(cams, name).view(6, 4)
        assert torch.equal(grouped, grouped[:, :1].expand(6, 4)), name
    az = torch.rad2deg(cams.azimuth).view(6, 4)
    step = torch.remainder(az[:, 1:] - az[:, :-1], 360.0)
    assert torch.allclose(step, torch.full_like(step, 90.0), atol=1e-3)
    assert (az >= -180).all() and (az < 180).all()
    assert az[:, 0].std() > 10  # one random offset per prompt
    # fov-scaled distance: distance * tan(fovy / 2) is the sampled factor in [0.8, 1.0]
    factor = cams.distance * torch.tan(cams.fovy / 2)
    assert factor.min() >= 0.8 - 1e-5 and factor.max() <= 1.0 + 1e-5
    fovy = torch.rad2deg(cams.fovy)
    assert fovy.min() >= 15 and fovy.max() <= 60


def test_independent_layout_with_several_views():
    cams = CameraSampler(**{**SD, "views_per_prompt": 3}).sample(
        2, generator=torch.Generator().manual_seed(0)
    )
    assert len(cams) == 6 and cams.num_prompts == 2
    assert len(set(cams.elevation.tolist())) == 6


def test_orbit_cameras_do_not_repeat_360():
    cams = orbit_cameras(4, elevation_deg=15.0, distance=1.5, fovy_deg=70.0, num_prompts=2)
    assert len(cams) == 8 and cams.views_per_prompt == 4
    assert torch.allclose(
        torch.rad2deg(cams.azimuth), torch.tensor([0.0, 90, 180, 270] * 2), atol=1e-4
    )
    assert torch.allclose(torch.rad2deg(cams.elevation), torch.full((8,), 15.0))
    assert torch.allclose(cams.centers.norm(dim=-1), torch.full((8,), 1.5))
    assert torch.allclose(
        cams.centers[0],
        torch.tensor([1.5 * math.cos(math.radians(15)), 0.0, 1.5 * math.sin(math.radians(15))]),
    )
    assert torch.allclose(
        cams.centers[1, :2], torch.tensor([0.0, 1.5 * math.cos(math.radians(15))]), atol=1e-6
    )
    az120 = orbit_cameras(120, 15.0, 1.5, 70.0).azimuth
    assert torch.rad2deg(az120[-1]).item() == pytest.approx(357.0, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"distance_range": [0.0, 1.0]}, "distance_range"),
        ({"distance_range": [1.5, 1.0]}, "distance_range"),
        ({"fovy_range_deg": [40, 180]}, "fovy_range_deg"),
        ({"elevation_range_deg": [-10, 95]}, "elevation_range_deg"),
        ({"views_per_prompt": 0}, "views_per_prompt"),
        ({"view_layout": "ring"}, "view_layout"),
        ({"distance_mode": "relative"}, "distance_mode"),
    ],
)
def test_sampler_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        CameraSampler(**{**SD, **kwargs})


def test_orbit_cameras_reject_bad_values():
    with pytest.raises(ValueError, match="fovy_deg"):
        orbit_cameras(4, 15.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="distance"):
        orbit_cameras(4, 15.0, -1.0, 70.0)


def test_plucker_rays_are_unit_directions_and_moments_whose_norm_is_the_distance_to_the_origin():
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(3)
    rays = plucker_rays(cameras.c2w, cameras.fovy, 5)
    assert rays.shape == (3, 6, 5, 5)
    directions, moments = rays[:, :3], rays[:, 3:]
    assert torch.allclose(directions.norm(dim=1), torch.ones(3, 5, 5), atol=1e-5)
    assert torch.allclose((directions * moments).sum(dim=1), torch.zeros(3, 5, 5), atol=1e-5)
    # The centre pixel's ray (odd size: through the image centre) passes through the origin the
    # cameras look at; its moment vanishes and its direction points from the camera to the origin.
    centre = rays[:, :, 2, 2]
    assert torch.allclose(centre[:, 3:], torch.zeros(3, 3), atol=1e-5)
    towards = torch.nn.functional.normalize(-cameras.centers, dim=-1)
    assert torch.allclose(centre[:, :3], towards, atol=1e-5)
    # Against the point-to-line distance computed from camera_rays directly.
    origins, dirs = camera_rays(cameras, 5, 5)
    closest = origins - (origins * dirs).sum(-1, keepdim=True) * dirs
    assert torch.allclose(moments.norm(dim=1), closest.norm(dim=-1), atol=1e-5)


def test_ray_points_nearest_origin_lie_on_their_rays_and_are_d_cross_the_moment():
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(3)
    rays = plucker_rays(cameras.c2w, cameras.fovy, 5)
    points = ray_points_nearest_origin(rays)
    assert points.shape == (3, 3, 5, 5)
    directions, moments = rays[:, :3], rays[:, 3:]
    # Perpendicular to its ray (the nearest point), on the ray, and equal to d x (o x d).
    assert torch.allclose((points * directions).sum(dim=1), torch.zeros(3, 5, 5), atol=1e-5)
    assert torch.allclose(points, torch.linalg.cross(directions, moments, dim=1), atol=1e-5)
    origins, dirs = camera_rays(cameras, 5, 5)
    offset = points.permute(0, 2, 3, 1) - origins  # along the ray, in front of the camera
    along = (offset * dirs).sum(-1, keepdim=True)
    assert (along > 0).all()
    assert torch.allclose(offset, along * dirs, atol=1e-5)
    # The centre pixel's ray passes through the origin the cameras look at.
    assert torch.allclose(points[:, :, 2, 2], torch.zeros(3, 3), atol=1e-5)
