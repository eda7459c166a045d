"""Scene variation: several valid scenes per prompt, so ``p(image | prompt, camera)`` has modes.

The grammar fixes what a prompt names (sizes, colours, shapes, relations) but not where exactly
an object sits along the sides of its relation: "a cube on top of a sphere" holds wherever the
cube's centre is over the sphere's footprint. A world with ``num_variants = K`` gives every
prompt ``K`` valid scenes, equally likely:

* variant 0 is the canonical layout (``asd3d.world.grammar.layout`` without offsets), so
  ``K = 1`` is exactly the single-scene world;
* variant ``k >= 1`` slides every relation's object across the relation
  (``grammar.lateral_axes``) by a seeded draw: a random direction in the lateral plane (or a
  random sign on a lateral line) and a magnitude uniform in ``[0.5, 1]`` of the largest offset
  the relation allows, so each variant is visibly off the canonical one.

The draws depend only on the prompt's digits, ``k`` and ``seed`` (``crc32``, never Python's
salted ``hash``): every process and machine sees the same ``K`` scenes, so the set is
enumerable and scoring can compare a render with the best-matching one.
"""

from __future__ import annotations

import functools
import math
import random
import zlib

from asd3d.world.grammar import Offsets, Terms, lateral_axes, layout, parse_terms
from asd3d.world.scene import SceneSpec

MIN_OFFSET = 0.5
"""Smallest lateral offset of a non-canonical variant, as a fraction of its largest one."""


def variant_offsets(terms: Terms, variant: int, seed: int) -> Offsets:
    """The lateral offset coefficients of variant ``variant`` of a prompt (zeros for 0)."""
    relations = terms[1]
    if variant == 0:
        return tuple(tuple(0.0 for _ in lateral_axes(r)) for r in relations)
    key = f"{seed}|{variant}|{terms}".encode()
    rng = random.Random(zlib.crc32(key))
    offsets: list[tuple[float, ...]] = []
    for relation in relations:
        magnitude = rng.uniform(MIN_OFFSET, 1.0)
        if len(lateral_axes(relation)) == 2:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            offsets.append((magnitude * math.cos(angle), magnitude * math.sin(angle)))
        else:
            offsets.append((magnitude if rng.random() < 0.5 else -magnitude,))
    return tuple(offsets)


@functools.lru_cache(maxsize=1 << 16)
def variant_scene(text: str, variant: int, seed: int) -> SceneSpec:
    """Scene ``variant`` of a procedural prompt text (cached; ValueError if not in the grammar)."""
    terms = parse_terms(text)
    return layout(terms, variant_offsets(terms, variant, seed) if variant else None)


class SceneVariation:
    """The world setting: how many valid scenes every prompt has, and which.

    Args:
        num_variants: ``K >= 1`` scenes per prompt (1: the single-scene world).
        seed: selects the variants' draws.
    """

    def __init__(self, num_variants: int, seed: int) -> None:
        if int(num_variants) != num_variants or num_variants < 1:
            raise ValueError(f"ground_truth.variants={num_variants!r} must be an integer >= 1")
        self.num_variants, self.seed = int(num_variants), int(seed)

    def scene(self, text: str, variant: int) -> SceneSpec:
        """Scene ``variant`` (in ``[0, K)``) of ``text``."""
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} outside [0, {self.num_variants})")
        return variant_scene(text, int(variant), self.seed)

    def scenes(self, text: str) -> list[SceneSpec]:
        """All ``K`` valid scenes of ``text``."""
        return [self.scene(text, k) for k in range(self.num_variants)]
