"""Mesh export: marching cubes on a generator's field, vertex colours from the field, GLB/OBJ/PLY.

The field of one prompt is sampled on a regular grid over the scene box ``[-radius, radius]^3``.
Two kinds of fields exist (:class:`~asd3d.types.FieldOutput`): signed distances (VolSDF; the
surface is ``sdf = level``, default 0, negative inside) and raw NeRF densities (the surface is
``density = level``, larger inside). Both are turned into one "insideness" volume (``-sdf`` or the
density) that marching cubes (PyMCubes) contours; the volume is padded with an outside value, so
a surface cut by the box is closed there instead of left open.

Never an empty mesh for a trained prompt (the release's export is broken): when nothing crosses
the requested level, the level moves to quantiles of the field's own values (top 1%, 5%, 10%,
25%, 50% of the grid inside) until a surface appears; a field constant over the grid is an error
naming the value.

Vertices are in world units; files are written with ``+y`` up by default (glTF's convention, and
what most viewers assume for OBJ/PLY): world ``(x, y, z)`` becomes ``(x, z, -y)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor
from tqdm import tqdm

from asd3d.io import atomic_write_bytes
from asd3d.types import Field

__all__ = [
    "FIELD_KINDS",
    "MESH_FORMATS",
    "ColoredMesh",
    "extract_mesh",
    "field_kind_of",
    "sample_grid",
    "to_trimesh",
    "write_mesh",
]

FIELD_KINDS = ("sdf", "density")
MESH_FORMATS = ("glb", "obj", "ply")
UP_AXES = ("y", "z")
#: Fractions of the grid counted inside when the requested level gives no surface.
FALLBACK_INSIDE_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5)


@dataclass(frozen=True)
class ColoredMesh:
    """A triangle mesh in world coordinates (``+z`` up) with per-vertex colours."""

    vertices: Float[np.ndarray, "N 3"]
    faces: Int[np.ndarray, "F 3"]
    colors: UInt8[np.ndarray, "N 3"]
    level: float  # the level actually contoured, in the field's units (SDF or density)
    requested_level: float  # NaN when none was given (density fields without mesh.level)

    @property
    def used_fallback_level(self) -> bool:
        """Whether the contoured level differs from the requested one (always, for no request)."""
        return self.level != self.requested_level


def field_kind_of(renderer: object) -> str:
    """``"sdf"`` or ``"density"``: what ``FieldOutput.sdf`` holds for fields this renderer draws.

    A renderer may declare it as a ``field_kind`` attribute; otherwise the volume renderers'
    ``normal_sign`` tells (``+1``: the scalar grows outward, an SDF; ``-1``: it grows inward, a
    density -- for the NeRF renderer the raw value before its monotonic activation, so a
    ``mesh.level`` is in raw units).
    """
    declared = getattr(renderer, "field_kind", None)
    if declared is not None:
        if declared not in FIELD_KINDS:
            raise ValueError(
                f"{type(renderer).__name__}.field_kind={declared!r} not in {FIELD_KINDS}"
            )
        return str(declared)
    sign = getattr(renderer, "normal_sign", None)
    if sign is not None:
        return "sdf" if float(sign) > 0 else "density"
    raise ValueError(
        f"cannot tell whether {type(renderer).__name__} renders SDF or density fields; "
        "set field_kind=sdf or field_kind=density"
    )


def _grid_axis(radius: float, resolution: int) -> Tensor:
    return torch.linspace(-radius, radius, resolution, dtype=torch.float64).float()


@torch.no_grad()
def sample_grid(
    field: Field,
    radius: float,
    resolution: int,
    device: torch.device | str,
    chunk_points: int,
    progress: bool = False,
) -> Float[Tensor, "X Y Z"]:
    """``FieldOutput.sdf`` of one prompt's field on a ``resolution^3`` grid over the box
    (endpoints included; index order x, y, z), on the CPU in float32. ``progress``: a bar over
    the grid's slabs."""
    if resolution < 2:
        raise ValueError(f"mesh resolution={resolution} must be >= 2")
    axis = _grid_axis(radius, resolution).to(device)
    values = torch.empty(resolution**3, dtype=torch.float32)
    # One x-slab at a time keeps the point tensor small; slabs are grouped up to chunk_points.
    slab = resolution * resolution
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    slabs_per_chunk = max(1, chunk_points // slab)
    starts = range(0, resolution, slabs_per_chunk)
    for start in tqdm(starts, desc="sampling the field", unit="chunk", disable=not progress):
        xs = axis[start : start + slabs_per_chunk]
        points = torch.cat([xs.repeat_interleave(slab)[:, None], yz.repeat(len(xs), 1)], dim=1)
        out = field(points[None])
        values[start * slab : (start + len(xs)) * slab] = out.sdf.reshape(-1).float().cpu()
    return values.view(resolution, resolution, resolution)


@torch.no_grad()
def _vertex_colors(
    field: Field,
    vertices: np.ndarray,
    device: torch.device | str,
    chunk_points: int,
    progress: bool = False,
) -> np.ndarray:
    points = torch.from_numpy(vertices).float().to(device)
    starts = range(0, len(points), chunk_points)
    rgb = [
        field(points[s : s + chunk_points][None]).rgb[0]
        for s in tqdm(starts, desc="colouring vertices", unit="chunk", disable=not progress)
    ]
    colors = torch.cat(rgb).float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return colors.cpu().numpy()


def _contour(inside: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    import mcubes

    # Pad with an outside value so surfaces that reach the box are closed on its faces.
    padded = np.pad(inside, 1, mode="constant", constant_values=min(inside.min(), level) - 1.0)
    vertices, faces = mcubes.marching_cubes(padded, level)
    return vertices - 1.0, faces.astype(np.int64)


def _candidate_levels(inside: np.ndarray, requested: float) -> list[float]:
    levels = [] if np.isnan(requested) else [requested]
    for fraction in FALLBACK_INSIDE_FRACTIONS:
        levels.append(float(np.quantile(inside, 1.0 - fraction)))
    low, high = float(inside.min()), float(inside.max())
    # A level must lie strictly between the extremes for any cell to cross it.
    return [lv for lv in levels if low < lv < high] or ([0.5 * (low + high)] if low < high else [])


def extract_mesh(
    field: Field,
    radius: float,
    resolution: int = 128,
    field_kind: str = "sdf",
    level: float | None = None,
    device: torch.device | str = "cpu",
    chunk_points: int = 262144,
    progress: bool = False,
) -> ColoredMesh:
    """Marching cubes on one prompt's field; vertex colours are the field's colour there.

    ``level``: the surface value in the field's units (default 0 for SDFs; for densities the
    default is the field's own top-1% quantile, see below). Falls back to quantiles of the
    grid's values when no surface crosses it (see the module docstring); raises ``ValueError``
    when the field is constant over the grid. ``progress``: bars over the grid sampling and
    the vertex colouring (long at resolutions of 256 and more).
    """
    if field_kind not in FIELD_KINDS:
        raise ValueError(f"field_kind={field_kind!r} is not one of {FIELD_KINDS}")
    if level is None:
        # SDFs have a natural surface (0); densities do not: their level comes from the field.
        level = 0.0 if field_kind == "sdf" else float("nan")
    values = sample_grid(field, radius, resolution, device, chunk_points, progress).numpy()
    sign = -1.0 if field_kind == "sdf" else 1.0  # contour "insideness": larger inside
    inside = sign * values.astype(np.float64)
    for candidate in _candidate_levels(inside, sign * float(level)):
        vertices, faces = _contour(inside, candidate)
        if len(faces):
            break
    else:
        raise ValueError(
            f"the field is constant over the {resolution}^3 grid ({field_kind} = "
            f"{float(values.flat[0]):.4g}); there is no surface to export"
        )
    step = 2.0 * radius / (resolution - 1)
    world = np.clip(vertices * step - radius, -radius, radius).astype(np.float32)
    return ColoredMesh(
        vertices=world,
        faces=faces,
        colors=_vertex_colors(field, world, device, chunk_points, progress),
        level=sign * candidate,
        requested_level=float(level),
    )


def to_trimesh(mesh: ColoredMesh, up_axis: str = "y"):
    """A ``trimesh.Trimesh`` with vertex colours, outward-facing normals, ``up_axis`` up."""
    import trimesh

    if up_axis not in UP_AXES:
        raise ValueError(f"up_axis={up_axis!r} is not one of {UP_AXES}")
    vertices = mesh.vertices.astype(np.float64)
    if up_axis == "y":
        vertices = np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)
    colors = np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)
    result = trimesh.Trimesh(
        vertices=vertices, faces=mesh.faces, vertex_colors=colors, process=False
    )
    if result.volume < 0:  # marching cubes' winding depends on the sign convention
        result.invert()
    return result


def write_mesh(
    mesh: ColoredMesh,
    stem: str | os.PathLike[str],
    formats: Sequence[str] = MESH_FORMATS,
    up_axis: str = "y",
) -> dict[str, Path]:
    """Write ``<stem>.<format>`` for each format atomically; returns ``{format: path}``."""
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"mesh formats {unknown} are unknown; use some of {list(MESH_FORMATS)}")
    exported = to_trimesh(mesh, up_axis)
    paths: dict[str, Path] = {}
    for fmt in formats:
        data = exported.export(file_type=fmt)
        path = Path(f"{stem}.{fmt}")
        atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
        paths[fmt] = path
    return paths
