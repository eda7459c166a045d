"""Scenes of the procedural world and their batched analytic field.

A ``SceneSpec`` is a few primitives with a colour, a scale and a position. ``SceneField`` holds
``P`` scenes (one per prompt) and implements the ``Field`` protocol of ``asd3d.types``: the scene's
SDF is the minimum over its objects, and the colour at a point is the colour of the object with
the smallest SDF there. The minimum is the exact distance to the union outside the objects; inside
too, because the grammar's objects never overlap (so exact wherever the primitives' SDFs are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.types import FieldOutput
from asd3d.world.primitives import PRIMITIVES, shape_id

# SDF of the padding slots of scenes with fewer objects than the batch's widest scene: larger
# than any distance inside the renderer's box, so a padding slot is never the nearest object.
_PAD_SDF = 1.0e4
# Elements (slots x points) per evaluation chunk on CPU.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class SceneObject:
    """One primitive: ``shape`` word, colour word and ``rgb`` in [0, 1], size word and its
    ``scale`` (world units per unit primitive), and the ``position`` of its bounding-box centre."""

    shape: str
    colour: str
    rgb: tuple[float, float, float]
    size: str
    scale: float
    position: tuple[float, float, float]

    def half_extent(self) -> tuple[float, float, float]:
        """Half side lengths of the object's axis-aligned bounding box (world units)."""
        ex, ey, ez = PRIMITIVES[shape_id(self.shape)].extent
        return (ex * self.scale, ey * self.scale, ez * self.scale)


@dataclass(frozen=True)
class SceneSpec:
    """A scene of one procedural prompt: its objects, in the order the prompt names them."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a SceneSpec needs at least one object")

    def __len__(self) -> int:
        return len(self.objects)

    def bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(lower, upper)`` corners of the scene's axis-aligned bounding box."""
        lows, highs = [], []
        for obj in self.objects:
            half = obj.half_extent()
            lows.append([c - e for c, e in zip(obj.position, half, strict=True)])
            highs.append([c + e for c, e in zip(obj.position, half, strict=True)])
        lower = tuple(min(v[i] for v in lows) for i in range(3))
        upper = tuple(max(v[i] for v in highs) for i in range(3))
        return lower, upper  # type: ignore[return-value]

    def radius(self) -> float:
        """Radius of a ball around the origin that holds every object's bounding box."""
        best = 0.0
        for obj in self.objects:
            corner = [abs(c) + e for c, e in zip(obj.position, obj.half_extent(), strict=True)]
            best = max(best, sum(v * v for v in corner) ** 0.5)
        return best


class SceneField:
    """The analytic field of ``P`` scenes (scene ``i`` answers the points of prompt ``i``).

    Objects are padded to the widest scene with a mask. Evaluation loops over the (at most eight)
    shape kinds, never over points or objects: each kind is evaluated once on all object slots of
    that kind, batched over scenes and points.

    Args:
        specs: one scene per prompt.
        device: where the scene tables live (points on another device move the tables).
    """

    def __init__(self, specs: Sequence[SceneSpec], device: torch.device | str = "cpu") -> None:
        if len(specs) == 0:
            raise ValueError("SceneField needs at least one scene")
        self.specs = tuple(specs)
        num_scenes, width = len(specs), max(len(s) for s in specs)
        centers = torch.zeros(num_scenes, width, 3)
        scales = torch.ones(num_scenes, width)
        rgb = torch.zeros(num_scenes, width, 3)
        shapes = torch.full((num_scenes, width), -1, dtype=torch.long)
        for i, spec in enumerate(specs):
            for k, obj in enumerate(spec.objects):
                centers[i, k] = torch.tensor(obj.position)
                scales[i, k] = obj.scale
                rgb[i, k] = torch.tensor(obj.rgb)
                shapes[i, k] = shape_id(obj.shape)
        self.centers: Float[Tensor, "P K 3"] = centers.to(device)
        self.scales: Float[Tensor, "P K"] = scales.to(device)
        self.rgb: Float[Tensor, "P K 3"] = rgb.to(device)
        self.shapes = shapes.to(device)
        # Flat slot indices (scene * width + k) per shape kind, computed once.
        flat = shapes.flatten()
        self._groups = [
            (kind, torch.nonzero(flat == kind).flatten().to(device))
            for kind in range(len(PRIMITIVES))
            if bool((flat == kind).any())
        ]
        self._padding = torch.nonzero(flat < 0).flatten().to(device)

    def __len__(self) -> int:
        return len(self.specs)

    def to(self, device: torch.device | str) -> SceneField:
        """A copy of the field with its tables on ``device``."""
        return SceneField(self.specs, device=device)

    def object_sdf(self, points: Float[Tensor, "P N 3"]) -> Float[Tensor, "P K N"]:
        """Signed distance of every point to every object slot (padding slots: a large value)."""
        self._check(points)
        return torch.cat([self._object_sdf(chunk) for chunk in self._chunks(points)], dim=-1)

    def __call__(self, points: Float[Tensor, "P N 3"]) -> FieldOutput:
        """SDF (minimum over objects) and colour of the nearest object at each point."""
        self._check(points)
        num_scenes, width = self.shapes.shape
        table = self.rgb.to(points.device, points.dtype).flatten(0, 1)  # (P*K) x 3
        base = torch.arange(num_scenes, device=points.device).unsqueeze(1) * width
        chunks = self._chunks(points)
        if len(chunks) == 1:
            return self._nearest(self._object_sdf(points), table, base)
        # Each chunk's results are copied out while they are still in cache (a final cat would
        # read them back from memory).
        sdf = points.new_empty(num_scenes, points.shape[1], 1)
        rgb = points.new_empty(num_scenes, points.shape[1], 3)
        start = 0
        for chunk in chunks:
            out = self._nearest(self._object_sdf(chunk), table, base)
            stop = start + chunk.shape[1]
            sdf[:, start:stop] = out.sdf
            rgb[:, start:stop] = out.rgb
            start = stop
        return FieldOutput(sdf=sdf, rgb=rgb)

    # ---------------------------------------------------------------------------- internals
    def _check(self, points: Tensor) -> None:
        num_scenes = self.shapes.shape[0]
        if points.ndim != 3 or points.shape[0] != num_scenes or points.shape[-1] != 3:
            raise ValueError(
                f"SceneField of {num_scenes} scenes expects points of shape "
                f"{num_scenes} x N x 3, got {tuple(points.shape)}"
            )

    def _chunks(self, points: Tensor) -> list[Tensor]:
        # Chunks of points keep the temporaries of the few dozen elementwise passes cache-sized
        # and let results be copied out while still cached: ~10-20% faster on CPU than whole-
        # batch passes (the time goes to data movement more than to SDF arithmetic).
        step = max(1, _CHUNK_ELEMENTS // (points.shape[0] * self.shapes.shape[1]))
        if points.device.type != "cpu" or points.shape[1] <= step:
            return [points]
        return list(points.split(step, dim=1))

    @staticmethod
    def _nearest(
        per_object: Float[Tensor, "P K n"], table: Float[Tensor, "PK 3"], base: Tensor
    ) -> FieldOutput:
        # A running minimum over the few slots, with the nearest slot tracked arithmetically:
        # on CPU ``min(dim=1)`` over a short middle dimension, ``where`` and ``masked_fill`` are
        # each several times slower than these elementwise steps.
        sdf = per_object[:, 0]
        nearest = torch.zeros_like(sdf)
        for k in range(1, per_object.shape[1]):
            closer = per_object[:, k] < sdf
            nearest = torch.addcmul(nearest, closer, k - nearest)
            sdf = torch.minimum(per_object[:, k], sdf)
        rgb = torch.nn.functional.embedding(nearest.long() + base, table)
        return FieldOutput(sdf=sdf.unsqueeze(-1), rgb=rgb)

    def _object_sdf(self, points: Float[Tensor, "P n 3"]) -> Float[Tensor, "P K n"]:
        num_scenes, width = self.shapes.shape
        device, dtype = points.device, points.dtype
        centers = self.centers.to(device, dtype).flatten(0, 1)
        scales = self.scales.to(device, dtype).flatten()
        out = points.new_empty(num_scenes * width, points.shape[1])
        # Structure of arrays: each gather below reads one coordinate (a strided view) and
        # writes contiguous rows, so the SDF arithmetic runs on contiguous memory.
        planes = points.unbind(-1)
        for kind, slots in self._groups:
            slots = slots.to(device)
            scale = scales[slots].unsqueeze(1)
            inv = 1.0 / scale
            shift = -centers[slots] * inv  # local = world / scale - centre / scale, one pass
            scenes = slots // width  # slot ``scene * width + k`` reads ``scene``'s points
            x, y, z = (
                torch.addcmul(shift[:, i : i + 1], planes[i].index_select(0, scenes), inv)
                for i in range(3)
            )
            out[slots] = PRIMITIVES[kind].sdf(x, y, z) * scale
        if len(self._padding):
            out[self._padding.to(device)] = _PAD_SDF
        return out.view(num_scenes, width, -1)
