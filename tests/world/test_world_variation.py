"""Several valid scenes per prompt: the canonical one first, the others slid across their
relations, every one still satisfying the prompt; seeded and enumerable."""

from __future__ import annotations

import itertools
import random

import pytest

from asd3d.world.grammar import (
    MAX_RADIUS,
    RELATIONS,
    PromptGrammar,
    one_attribute_changes,
    parse,
    parse_terms,
)
from asd3d.world.variation import SceneVariation, variant_offsets


def _overlap_free(scene) -> bool:
    for a, b in itertools.combinations(scene.objects, 2):
        gaps = [
            abs(pa - pb) - ea - eb
            for pa, pb, ea, eb in zip(
                a.position, b.position, a.half_extent(), b.half_extent(), strict=True
            )
        ]
        if max(gaps) < -1e-9:
            return False
    return True


def test_one_variant_is_the_single_scene_world():
    text = "a small red cube on top of a large blue cylinder"
    assert SceneVariation(1, seed=0).scenes(text) == [parse(text)]
    assert SceneVariation(3, seed=5).scene(text, 0) == parse(text)


def test_variants_are_distinct_seeded_and_valid():
    grammar = PromptGrammar([2, 3])
    variation = SceneVariation(3, seed=0)
    rng = random.Random(0)
    for index in [rng.randrange(grammar.size) for _ in range(300)]:
        text = grammar.decode(index)
        scenes = variation.scenes(text)
        assert len(set(scenes)) == 3, text  # three different layouts
        assert scenes == SceneVariation(3, seed=0).scenes(text)  # same draws every time
        for scene in scenes:
            assert _overlap_free(scene), text
            assert scene.radius() <= MAX_RADIUS + 1e-9
            # The relation still holds: object j is on its side of object j + 1.
            objects, relations = parse_terms(text)
            for j, relation in enumerate(relations):
                direction = RELATIONS[relation][1]
                first, second = scene.objects[j].position, scene.objects[j + 1].position
                along = sum(d * (a - b) for d, a, b in zip(direction, first, second, strict=True))
                assert along > 0.05, text
    assert SceneVariation(3, seed=1).scenes(text) != SceneVariation(3, seed=0).scenes(text)


@pytest.mark.parametrize("relation", ["on top of", "under"])
def test_stacked_objects_keep_the_upper_centre_over_the_lower_footprint(relation):
    text = f"a large red cube {relation} a small blue cylinder"
    for scene in SceneVariation(8, seed=0).scenes(text):
        upper, lower = sorted(scene.objects, key=lambda o: -o.position[2])
        for axis in (0, 1):
            reach = lower.half_extent()[axis]
            assert abs(upper.position[axis] - lower.position[axis]) <= reach + 1e-9


def test_variant_offsets_stay_in_range():
    terms = parse_terms("a medium green sphere next to a small pink cone under a large black torus")
    assert variant_offsets(terms, 0, seed=0) == ((0.0,), (0.0, 0.0))
    for k in range(1, 20):
        for coefficients in variant_offsets(terms, k, seed=0):
            size = sum(c * c for c in coefficients) ** 0.5
            assert 0.5 - 1e-9 <= size <= 1.0 + 1e-9


def test_bad_variant_settings_fail_with_the_key():
    with pytest.raises(ValueError, match="ground_truth.variants=0"):
        SceneVariation(0, seed=0)
    with pytest.raises(IndexError):
        SceneVariation(2, seed=0).scene("a small red cube", 2)


def test_one_attribute_changes_differ_in_exactly_one_slot():
    text = "a small red cube on top of a large blue sphere"
    changes = one_attribute_changes(text, 8, seed=0)
    assert len(set(changes)) == 8 and text not in changes
    assert changes == one_attribute_changes(text, 8, seed=0)
    base = text.split()
    for changed in changes:
        words = changed.split()
        if len(words) == len(base):
            assert sum(a != b for a, b in zip(words, base, strict=True)) == 1, changed
        else:  # a relation phrase of another length
            assert parse_terms(changed)[0] == parse_terms(text)[0], changed
    slots_hit = set()
    for changed in changes:
        (a, b), (r,) = parse_terms(changed)
        (a0, b0), (r0,) = parse_terms(text)
        slots_hit.add((a != a0, b != b0, r != r0))
    assert slots_hit == {(True, False, False), (False, True, False), (False, False, True)}
    with pytest.raises(ValueError, match="one-attribute changes"):
        one_attribute_changes("a small red cube", 100, seed=0)
