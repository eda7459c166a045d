"""Camera sampling and ray generation (REFERENCE.md §5, §7).

Conventions (also stated in :mod:`asd3d.types`): the world is ``+z`` up; camera-to-world
matrices are OpenGL-style (the camera looks down its local ``-z``, ``+y`` is up, ``+x`` right);
a camera at azimuth ``a``, elevation ``e`` and distance ``d`` sits at
``d * (cos e cos a, cos e sin a, sin e)`` looking at the origin, so azimuth 0 is on ``+x``.
Angles are radians in tensors and degrees in configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.transfer import to_device
from asd3d.types import Cameras

VIEW_LAYOUTS = ("independent", "orbit")
DISTANCE_MODES = ("absolute", "fov_scaled")


def _unit_axis(axis: int, like: Tensor) -> Float[Tensor, "3"]:
    """World axis ``axis`` as a vector on ``like``'s device (filled there: no host copy)."""
    unit = torch.zeros(3, dtype=like.dtype, device=like.device)
    unit[axis] = 1.0
    return unit


def look_at(
    centers: Float[Tensor, "B 3"],
    target: Float[Tensor, "B 3"] | None = None,
    up: Float[Tensor, "3"] | None = None,
) -> Float[Tensor, "B 4 4"]:
    """OpenGL camera-to-world matrices of cameras at ``centers`` looking at ``target``.

    ``target`` defaults to the origin and ``up`` to world ``+z``. Where the view direction is
    parallel to ``up`` (elevation ±90°) world ``+y`` serves as the up hint instead, so the
    matrix stays a rotation rather than becoming NaN.
    """
    if target is None:
        target = torch.zeros_like(centers)
    if up is None:
        up = _unit_axis(2, centers)
    forward = torch.nn.functional.normalize(target - centers, dim=-1)
    up = up.expand_as(forward)
    right = torch.linalg.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.linalg.cross(forward, _unit_axis(1, centers).expand_as(forward), dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, fallback, right), dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(*centers.shape[:-1], 4, 4, dtype=centers.dtype, device=centers.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = true_up
    c2w[..., :3, 2] = -forward  # OpenGL: the camera looks down its local -z
    c2w[..., :3, 3] = centers
    c2w[..., 3, 3] = 1.0
    return c2w


def spherical_to_cartesian(
    elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"], distance: Float[Tensor, "B"]
) -> Float[Tensor, "B 3"]:
    """Camera centres from spherical coordinates (radians; ``+z`` up, azimuth 0 on ``+x``)."""
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


def _cameras_from_spherical(
    elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy: Tensor, views_per_prompt: int
) -> Cameras:
    c2w = look_at(spherical_to_cartesian(elevation, azimuth, distance))
    return Cameras(
        c2w=c2w,
        fovy=fovy,
        elevation=elevation,
        azimuth=azimuth,
        distance=distance,
        views_per_prompt=views_per_prompt,
    )


def _check_range(
    name: str, value: Sequence[float], low: float, high: float, open_low: bool = False
) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name}={list(value)} must be a [min, max] pair")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{name}={[lo, hi]} has min > max")
    if (lo <= low if open_low else lo < low) or hi > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={[lo, hi]} lies outside {bracket}{low}, {high}]")
    return lo, hi


def _uniform(
    bounds: tuple[float, float], count: int, generator: torch.Generator | None, scale: float = 1.0
) -> Tensor:
    # Drawn on the generator's device (CPU when there is none) so the same seed gives the same
    # cameras whatever device the renders go to.
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
    lo, hi = bounds[0] * scale, bounds[1] * scale
    return (lo + (hi - lo) * u).float()


class CameraSampler:
    """Random training cameras around the origin (REFERENCE.md §5).

    Args:
        distance_range: ``[min, max]`` camera distance (``absolute``) or the multiplier of
            ``cot(fovy / 2)`` (``fov_scaled``, MVDream: the object then fills the same fraction
            of the image whatever the field of view).
        fovy_range_deg: ``[min, max]`` vertical field of view in degrees, in ``(0, 180)``.
        elevation_range_deg: ``[min, max]`` elevation in degrees, in ``[-90, 90]``.
        azimuth_range_deg: ``[min, max]`` azimuth in degrees (``orbit``: range of the offset).
        views_per_prompt: ``V`` views rendered per prompt.
        view_layout: ``independent`` draws every view's parameters separately; ``orbit`` draws
            one elevation/fov/distance and one azimuth offset per prompt and spaces the ``V``
            views ``360°/V`` apart (MVDream's 4 views 90° apart).
        distance_mode: ``absolute`` or ``fov_scaled`` (see ``distance_range``).
    """

    def __init__(
        self,
        distance_range: Sequence[float],
        fovy_range_deg: Sequence[float],
        elevation_range_deg: Sequence[float],
        azimuth_range_deg: Sequence[float],
        views_per_prompt: int = 1,
        view_layout: str = "independent",
        distance_mode: str = "absolute",
    ) -> None:
        self.distance_range = _check_range(
            "distance_range", distance_range, 0.0, math.inf, open_low=True
        )
        self.fovy_range_deg = _check_range(
            "fovy_range_deg", fovy_range_deg, 0.0, 180.0, open_low=True
        )
        if self.fovy_range_deg[1] >= 180.0:
            raise ValueError(f"fovy_range_deg={list(self.fovy_range_deg)} must stay below 180")
        self.elevation_range_deg = _check_range(
            "elevation_range_deg", elevation_range_deg, -90.0, 90.0
        )
        self.azimuth_range_deg = _check_range(
            "azimuth_range_deg", azimuth_range_deg, -math.inf, math.inf
        )
        if int(views_per_prompt) != views_per_prompt or views_per_prompt < 1:
            raise ValueError(f"views_per_prompt={views_per_prompt} must be a positive integer")
        if view_layout not in VIEW_LAYOUTS:
            raise ValueError(f"view_layout={view_layout!r} is not one of {VIEW_LAYOUTS}")
        if distance_mode not in DISTANCE_MODES:
            raise ValueError(f"distance_mode={distance_mode!r} is not one of {DISTANCE_MODES}")
        self.views_per_prompt = int(views_per_prompt)
        self.view_layout = view_layout
        self.distance_mode = distance_mode

    def sample(
        self,
        num_prompts: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Cameras:
        """``B = num_prompts * V`` cameras, the views of a prompt consecutive, on ``device``.

        Deterministic given ``generator``'s state: all draws and the matrices are made on the
        generator's device (the CPU for a CPU generator), then moved in one copy
        (:func:`move_cameras`), which keeps the angles on the host for view-dependent prompting.
        """
        if num_prompts < 1:
            raise ValueError(f"num_prompts={num_prompts} must be at least 1")
        V = self.views_per_prompt
        draws = num_prompts if self.view_layout == "orbit" else num_prompts * V
        rad = math.pi / 180.0
        elevation = _uniform(self.elevation_range_deg, draws, generator, rad)
        azimuth = _uniform(self.azimuth_range_deg, draws, generator, rad)
        fovy = _uniform(self.fovy_range_deg, draws, generator, rad)
        distance = _uniform(self.distance_range, draws, generator)
        if self.view_layout == "orbit":

            def per_view(x: Tensor) -> Tensor:
                return x.repeat_interleave(V)

            elevation, fovy, distance = per_view(elevation), per_view(fovy), per_view(distance)
            steps = torch.arange(V, device=azimuth.device).repeat(num_prompts) * (2 * math.pi / V)
            # Wrap into [-pi, pi) so view-dependent prompting sees one range for both layouts.
            azimuth = torch.remainder(per_view(azimuth) + steps + math.pi, 2 * math.pi) - math.pi
        if self.distance_mode == "fov_scaled":
            distance = distance / torch.tan(fovy / 2)
        return move_cameras(_cameras_from_spherical(elevation, azimuth, distance, fovy, V), device)


_PACKED = ("c2w", "fovy", "elevation", "azimuth", "distance")


def move_cameras(cameras: Cameras, device: torch.device | str) -> Cameras:
    """``cameras`` on ``device`` in one copy, non-blocking from pinned memory when CPU -> CUDA.

    The five tensors travel packed as one ``B x 20`` block; a move off the CPU keeps the host's
    ``(elevation, azimuth)`` in ``host_angles``, so reading them later costs no device sync.
    """
    device = torch.device(device)
    source = cameras.c2w.device
    if source == device or (device.type == source.type and device.index is None):
        if source.type == "cpu":  # host cameras are their own host copy
            return replace(cameras, host_angles=(cameras.elevation, cameras.azimuth))
        return cameras
    B = len(cameras)
    packed = torch.cat([getattr(cameras, name).reshape(B, -1).float() for name in _PACKED], dim=1)
    moved = to_device(packed, device)
    c2w, fovy, elevation, azimuth, distance = moved.split([16, 1, 1, 1, 1], dim=1)
    host_angles = (cameras.elevation, cameras.azimuth) if source.type == "cpu" else None
    return Cameras(
        c2w=c2w.reshape(B, 4, 4),
        fovy=fovy.reshape(B),
        elevation=elevation.reshape(B),
        azimuth=azimuth.reshape(B),
        distance=distance.reshape(B),
        views_per_prompt=cameras.views_per_prompt,
        host_angles=host_angles,
    )


def orbit_cameras(
    num_views: int,
    elevation_deg: float,
    distance: float,
    fovy_deg: float,
    num_prompts: int = 1,
    device: torch.device | str = "cpu",
) -> Cameras:
    """Evaluation turntable (REFERENCE.md §7): azimuths ``linspace`` over ``[0°, 360°)``.

    Unlike the release, 360° is not repeated: view ``k`` sits at ``360° k / num_views``. The
    orbit is repeated for each of ``num_prompts`` prompts (``B = num_prompts * num_views``).
    """
    if num_views < 1 or num_prompts < 1:
        raise ValueError(f"num_views={num_views}, num_prompts={num_prompts} must be at least 1")
    if not -90.0 <= elevation_deg <= 90.0:
        raise ValueError(f"elevation_deg={elevation_deg} lies outside [-90, 90]")
    if distance <= 0:
        raise ValueError(f"distance={distance} must be positive")
    if not 0.0 < fovy_deg < 180.0:
        raise ValueError(f"fovy_deg={fovy_deg} lies outside (0, 180)")
    B = num_views * num_prompts
    azimuth = (torch.arange(num_views, dtype=torch.float64) * (2 * math.pi / num_views)).float()

    def full(value: float) -> Tensor:
        return torch.full((B,), value, dtype=torch.float32)

    cameras = _cameras_from_spherical(
        full(math.radians(elevation_deg)),
        azimuth.repeat(num_prompts),
        full(distance),
        full(math.radians(fovy_deg)),
        num_views,
    )
    return move_cameras(cameras, device)


def camera_rays(
    cameras: Cameras, height: int, width: int
) -> tuple[Float[Tensor, "B H W 3"], Float[Tensor, "B H W 3"]]:
    """World-space rays through the pixel centres: ``(origins, unit directions)``.

    Pinhole with square pixels; ``fovy`` spans the image height; row 0 is the top of the image.
    """
    return pixel_rays(cameras.c2w, cameras.fovy, height, width)


def pixel_rays(
    c2w: Float[Tensor, "B 4 4"], fovy: Float[Tensor, "B"], height: int, width: int
) -> tuple[Float[Tensor, "B H W 3"], Float[Tensor, "B H W 3"]]:
    """:func:`camera_rays` from the bare camera-to-world matrices and vertical fields of view."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    dtype, device = c2w.dtype, c2w.device
    focal = (height / 2) / torch.tan(fovy.to(dtype) / 2)  # B, in pixels
    cols = torch.arange(width, dtype=dtype, device=device) + 0.5 - width / 2
    rows = torch.arange(height, dtype=dtype, device=device) + 0.5 - height / 2
    x = cols[None, None, :] / focal[:, None, None]
    y = -rows[None, :, None] / focal[:, None, None]  # image rows go down, camera +y goes up
    x, y = torch.broadcast_tensors(x, y)
    local = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # B H W 3
    directions = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], local)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def plucker_rays(
    c2w: Float[Tensor, "B 4 4"], fovy: Float[Tensor, "B"], resolution: int
) -> Float[Tensor, "B 6 r r"]:
    """Per-pixel Plücker coordinates of the camera rays, channel-first: the unit direction ``d``
    and the moment ``o x d`` (whose norm is the ray's distance from the world origin, where the
    scene sits). A pixel-aligned camera code a convolutional network reads directly (used as
    extra input channels by camera-conditioned diffusion models, e.g. CAT3D / SPAD)."""
    origins, directions = pixel_rays(c2w, fovy, resolution, resolution)
    moments = torch.linalg.cross(origins, directions, dim=-1)
    return torch.cat([directions, moments], dim=-1).permute(0, 3, 1, 2).contiguous()


def ray_points_nearest_origin(rays: Float[Tensor, "B 6 r r"]) -> Float[Tensor, "B 3 r r"]:
    """Per-pixel world position where each camera ray passes closest to the origin,
    ``o - (o . d) d = d x (o x d)``, from the channel-first Plücker rays of :func:`plucker_rays`.

    For a scene at the origin it is, to first order, the world point the pixel looks at: "this
    pixel sees the +x side of the scene" is a threshold on one channel, where from the Plücker
    coordinates alone a network would first have to learn this cross product.
    """
    return torch.linalg.cross(rays[:, :3], rays[:, 3:], dim=1)
