"""The prompt grammar: bijective enumeration, parsing, and scene layout."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from asd3d.world.grammar import (
    COLOURS,
    MAX_RADIUS,
    RELATIONS,
    SHAPES,
    SIZES,
    PromptGrammar,
    parse,
    parse_terms,
    prompt_space_size,
)
from asd3d.world.primitives import PRIMITIVES


def test_vocabulary_sizes_and_colour_separation():
    assert len(SHAPES) >= 8 and len(COLOURS) == 10 and len(SIZES) == 3 and len(RELATIONS) == 7
    for (a, ra), (b, rb) in itertools.combinations(COLOURS, 2):
        assert math.dist(ra, rb) > 0.3, (a, b)
    for name, rgb in COLOURS:  # ground truth is rendered over white
        assert math.dist(rgb, (1.0, 1.0, 1.0)) > 0.5, name


def test_prompt_space_sizes():
    assert prompt_space_size([1]) == 240
    assert prompt_space_size([2]) == 240 * 7 * 240 == 403_200
    assert prompt_space_size([1, 2, 3]) == 240 + 403_200 + 240**3 * 49 == 677_779_440
    assert len(PromptGrammar([3, 2, 2])) == prompt_space_size([2, 3])


@pytest.mark.parametrize("counts", [[1], [2], [1, 2, 3]])
def test_decode_encode_parse_round_trip(counts):
    grammar = PromptGrammar(counts)
    rng = random.Random(0)
    indices = [0, grammar.size - 1] + [rng.randrange(grammar.size) for _ in range(2000)]
    for index in indices:
        text = grammar.decode(index)
        assert grammar.encode(text) == index
        assert parse(text) == grammar.scene(index)
        assert len(parse(text)) in counts


def test_small_grammar_is_a_bijection():
    grammar = PromptGrammar([1])
    texts = [grammar.decode(i) for i in range(grammar.size)]
    assert len(set(texts)) == grammar.size


def test_example_prompt():
    text = "a small red cube on top of a large blue cylinder next to a medium green sphere"
    scene = parse(text)
    cube, cylinder, sphere = scene.objects
    assert (cube.shape, cube.colour, cube.size) == ("cube", "red", "small")
    assert cylinder.rgb == dict(COLOURS)["blue"]
    # on top of: the cube rests on the cylinder (touching, +z).
    assert cube.position[2] - cube.half_extent()[2] == pytest.approx(
        cylinder.position[2] + cylinder.half_extent()[2]
    )
    # next to (3rd relates to 2nd): the cylinder is diagonally in front-right of the sphere.
    assert cylinder.position[0] > sphere.position[0] and cylinder.position[1] > sphere.position[1]
    assert parse("  A Small RED cube  on top of a large blue cylinder ") == parse(
        "a small red cube on top of a large blue cylinder"
    )


@pytest.mark.parametrize(
    "relation, axis, sign",
    [
        ("on top of", 2, 1),
        ("under", 2, -1),
        ("to the left of", 1, -1),
        ("to the right of", 1, 1),
        ("in front of", 0, 1),
        ("behind", 0, -1),
    ],
)
def test_relation_directions(relation, axis, sign):
    first, second = parse(f"a medium red cube {relation} a medium blue sphere").objects
    assert sign * (first.position[axis] - second.position[axis]) > 0.1
    for other in {0, 1, 2} - {axis}:
        assert first.position[other] == pytest.approx(second.position[other])


def test_scenes_are_centred_disjoint_and_inside_the_ball():
    grammar = PromptGrammar([1, 2, 3])
    rng = random.Random(1)
    for index in [grammar.size - 1] + [rng.randrange(grammar.size) for _ in range(2000)]:
        scene = grammar.scene(index)
        lo, hi = scene.bounds()
        assert all(abs(a + b) < 1e-9 for a, b in zip(lo, hi, strict=True))  # bounding box centred
        assert scene.radius() <= MAX_RADIUS + 1e-9
        for a, b in itertools.combinations(scene.objects, 2):  # boxes never overlap
            gaps = [
                abs(pa - pb) - ea - eb
                for pa, pb, ea, eb in zip(
                    a.position, b.position, a.half_extent(), b.half_extent(), strict=True
                )
            ]
            assert max(gaps) >= -1e-9, grammar.decode(index)


def test_smallest_objects_are_several_pixels_wide():
    # 32x32 render from the farthest, widest SD camera: distance 1.5, 70 degree field of view.
    pixel = 2 * 1.5 * math.tan(math.radians(35)) / 32
    small = min(s for _, s in SIZES)
    widths = {p.name: 2 * min(p.extent[:2]) * small / pixel for p in PRIMITIVES}
    assert min(widths.values()) > 2.0 and widths["sphere"] > 3.5, widths


@pytest.mark.parametrize(
    "text, word",
    [
        ("a small red cube on top of a blue sphere", "'blue'"),
        ("a small red cube on tp of a large blue sphere", "'on'"),
        ("a tiny red cube", "'tiny'"),
        ("", "end of the text"),
        ("a small red cube next to", "end of the text"),
        (
            "a small red cube next to a small red cube next to a small red cube next to a small red cube",
            "'next'",
        ),
    ],
)
def test_parse_rejects_text_outside_the_grammar(text, word):
    with pytest.raises(ValueError) as info:
        parse_terms(text)
    message = str(info.value)
    assert repr(text) in message and word in message and "\n" not in message


def test_grammar_checks_counts_and_indices():
    with pytest.raises(ValueError, match=r"object_counts=\[4\]"):
        PromptGrammar([4])
    grammar = PromptGrammar([2])
    with pytest.raises(ValueError, match="names 1 objects"):
        grammar.encode("a small red cube")
    with pytest.raises(IndexError, match="403200"):
        grammar.decode(grammar.size)
