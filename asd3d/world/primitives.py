"""Primitive shapes of the procedural world and their analytic signed distance functions.

Every primitive is defined at unit scale in its local frame (centred on its bounding box, ``+z``
up) and fits in the box ``[-ex, ex] x [-ey, ey] x [-ez, ez]`` given by ``extent``; an object of
scale ``s`` at ``c`` has ``sdf(p) = s * unit_sdf((p - c) / s)``.

Exact signed distances: box, sphere, cylinder, cone, torus, capsule. The octahedron and the
pyramid use the maximum of their face-plane distances: exact wherever the nearest surface point
lies on a face (everywhere inside), a lower bound near edges and vertices outside. A lower bound
keeps ``|sdf|`` from overshooting, which is all sphere tracing and the VolSDF density need.

The functions take the local coordinates ``x, y, z`` as separate same-shaped tensors, use few
temporaries (one scene batch is millions of points) and no in-place ops, so autograd through the
points works (normals, eikonal checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Unit SDFs take the local coordinates as three same-shaped tensors (structure of arrays:
# contiguous components are much faster than strided ``[..., i]`` slices of ``... x 3``).
UnitSDF = Callable[[Tensor, Tensor, Tensor], Tensor]


# Unit-scale dimensions (multiples of the object's scale ``s``), chosen so that the shapes look
# about equally big at one size word while each stays several pixels wide at 32x32.
_BOX_HALF = 0.8
_CYL_RADIUS, _CYL_HALF_HEIGHT = 0.8, 0.9
_CONE_RADIUS, _CONE_HALF_HEIGHT = 0.9, 0.9
_TORUS_MAJOR, _TORUS_MINOR = 0.65, 0.35
_CAPSULE_RADIUS, _CAPSULE_HALF_SEGMENT = 0.6, 0.4
_PYRAMID_HALF_BASE, _PYRAMID_HALF_HEIGHT = 0.85, 0.9


def _length2(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def box_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the cube with half side 0.8."""
    dx, dy, dz = x.abs() - _BOX_HALF, y.abs() - _BOX_HALF, z.abs() - _BOX_HALF
    outside = torch.sqrt(
        dx.clamp(min=0.0).square() + dy.clamp(min=0.0).square() + dz.clamp(min=0.0).square()
    )
    return outside + torch.maximum(torch.maximum(dx, dy), dz).clamp(max=0.0)


def sphere_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the unit sphere."""
    return torch.sqrt(x * x + y * y + z * z) - 1.0


def cylinder_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the z-aligned cylinder of radius 0.8 and half height 0.9."""
    dr = _length2(x, y) - _CYL_RADIUS
    dz = z.abs() - _CYL_HALF_HEIGHT
    outside = _length2(dr.clamp(min=0.0), dz.clamp(min=0.0))
    return outside + torch.maximum(dr, dz).clamp(max=0.0)


def cone_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the upright cone (base radius 0.9 at z=-0.9, apex at z=+0.9).

    A solid of revolution's distance is the 2D distance to its meridian section, here the
    triangle ``(0,-h), (R,-h), (0,h)`` in ``(rho, z)``; with ``rho >= 0`` the nearest boundary
    point lies on the base or the slanted edge (the axis edge is interior to the full section).
    """
    radius, h = _CONE_RADIUS, _CONE_HALF_HEIGHT
    rho = _length2(x, y)
    zh = z + h
    # Distance to the base segment (0,-h)-(R,-h).
    base = _length2((rho - radius).clamp(min=0.0), zh)
    # Distance to the slanted segment from (R,-h) to (0,h): direction (-R, 2h).
    ex, ez = -radius, 2.0 * h
    inv = 1.0 / (ex * ex + ez * ez)
    t = ((rho - radius) * (ex * inv) + zh * (ez * inv)).clamp(0.0, 1.0)
    slant = _length2(rho - radius - t * ex, zh - t * ez)
    # Inside: above the base and below the slanted line through (R,-h) and (0,h).
    inside = (zh >= 0.0) & ((2.0 * h) * rho + radius * z <= radius * h)
    dist = torch.minimum(base, slant)
    return dist - 2.0 * dist * inside  # a sign flip; ``torch.where`` is slower on CPU


def torus_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the torus around z (major radius 0.65, tube radius 0.35)."""
    return _length2(_length2(x, y) - _TORUS_MAJOR, z) - _TORUS_MINOR


def capsule_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Exact SDF of the vertical capsule (radius 0.6, segment z in [-0.4, 0.4])."""
    dz = z - z.clamp(-_CAPSULE_HALF_SEGMENT, _CAPSULE_HALF_SEGMENT)
    return torch.sqrt(x * x + y * y + dz * dz) - _CAPSULE_RADIUS


def octahedron_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Face-plane bound of the octahedron ``|x| + |y| + |z| <= 1`` (exact inside)."""
    return (x.abs() + y.abs() + z.abs() - 1.0) * (1.0 / math.sqrt(3.0))


def pyramid_sdf(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Face-plane bound of the square pyramid (half base 0.85 at z=-0.9, apex at z=+0.9)."""
    b, h = _PYRAMID_HALF_BASE, _PYRAMID_HALF_HEIGHT
    # Side planes through (b,-h) and (0,h) in the (|x|, z) and (|y|, z) sections.
    norm = 1.0 / math.sqrt(4.0 * h * h + b * b)
    lateral = torch.maximum(x.abs(), y.abs())
    side = lateral * (2.0 * h * norm) + z * (b * norm) - b * h * norm
    return torch.maximum(side, -z - h)


@dataclass(frozen=True)
class Primitive:
    """A shape of the grammar: its word, unit SDF and unit bounding-box half extents."""

    name: str
    sdf: UnitSDF
    extent: tuple[float, float, float]
    exact: bool


PRIMITIVES: tuple[Primitive, ...] = (
    Primitive("cube", box_sdf, (_BOX_HALF,) * 3, True),
    Primitive("sphere", sphere_sdf, (1.0, 1.0, 1.0), True),
    Primitive("cylinder", cylinder_sdf, (_CYL_RADIUS, _CYL_RADIUS, _CYL_HALF_HEIGHT), True),
    Primitive("cone", cone_sdf, (_CONE_RADIUS, _CONE_RADIUS, _CONE_HALF_HEIGHT), True),
    Primitive("torus", torus_sdf, (_TORUS_MAJOR + _TORUS_MINOR,) * 2 + (_TORUS_MINOR,), True),
    Primitive(
        "capsule",
        capsule_sdf,
        (_CAPSULE_RADIUS, _CAPSULE_RADIUS, _CAPSULE_RADIUS + _CAPSULE_HALF_SEGMENT),
        True,
    ),
    Primitive("octahedron", octahedron_sdf, (1.0, 1.0, 1.0), False),
    Primitive(
        "pyramid",
        pyramid_sdf,
        (_PYRAMID_HALF_BASE, _PYRAMID_HALF_BASE, _PYRAMID_HALF_HEIGHT),
        False,
    ),
)
"""All primitives; a shape's id is its position here."""

SHAPE_IDS: dict[str, int] = {p.name: i for i, p in enumerate(PRIMITIVES)}


def shape_id(name: str) -> int:
    """The id of a shape word; ValueError naming it when unknown."""
    try:
        return SHAPE_IDS[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPE_IDS)}") from None
