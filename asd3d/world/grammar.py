"""The compositional prompt grammar of the procedural world, and the layout of its scenes.

A prompt names one to three objects, each ``a <size> <colour> <shape>``, joined by relations:
``"a small red cube on top of a large blue cylinder next to a medium green sphere"``. Relation
``j`` relates object ``j`` to object ``j + 1`` (the third object relates to the second).

Prompt space: the prompts with ``k`` objects are the mixed-radix numbers with digits
``o_1, r_1, o_2, ..., r_{k-1}, o_k`` (least significant first), where an object digit is
``(shape * 10 + colour) * 3 + size`` in ``[0, 240)`` and a relation digit is in ``[0, 7)``; the
blocks of the allowed object counts are concatenated in increasing count. So ``decode`` maps
``[0, M)`` bijectively onto the prompts and ``encode`` inverts it, with
``M = 240`` for ``[1]``, ``403,200`` for ``[2]``, ``677,376,000`` for ``[3]`` and
``677,779,440`` for ``[1, 2, 3]``.

World frame (``+z`` up, the front camera at azimuth 0 sits on ``+x`` looking at the origin, so
it sees ``+y`` on its right):

* ``on top of`` = ``+z``, ``under`` = ``-z`` (touching: the object rests on the other),
* ``in front of`` = ``+x``, ``behind`` = ``-x``,
* ``to the left of`` = ``-y``, ``to the right of`` = ``+y`` (as seen from the front camera),
* ``next to`` = the horizontal diagonal ``(+x, +y) / sqrt 2`` (in front and to the right),

with a gap of ``0.06`` between objects in horizontal relations. Objects are placed in reading
order: object ``j + 1`` goes from object ``j`` opposite to relation ``j``'s direction, just
beyond the bounding box of everything placed so far, so no two objects ever overlap. The scene's
bounding box is then centred at the origin, and a scene whose object boxes would leave the ball
of radius ``0.8`` is shrunk uniformly to fit it (two large stacked objects and long chains of
three objects).
Sizes are scales ``0.18 / 0.25 / 0.32`` (a unit primitive spans about ``[-1, 1]``), so a small
object is ~5 pixels wide in a 32x32 render at distance 1.5 and 70 degrees of field of view: the
scene fills most of the evaluation views, as a real object does.

Scene variation (``asd3d.world.variation``): ``layout`` takes optional lateral offsets, one per
relation, that slide object ``j + 1``'s anchor (object ``j``'s centre) across the relation
direction before the placement above: horizontally for ``on top of`` / ``under`` (the upper
object's centre stays over the lower one's footprint), along the other horizontal axis for the
axis-aligned horizontal relations, and along the other diagonal for ``next to``; a coefficient
of ``+-1`` moves the anchor by the lower object's half extent along that axis for vertical
relations (the upper object's centre stays over the lower one's footprint), by the larger of the
two objects' half extents for horizontal ones (the smaller one's centre stays within the larger
one's span). The relation
still holds and nothing overlaps (the placement clears the whole group's box from the shifted
anchor). Without offsets the layout is the canonical one described above.

Note: "A on top of B" and "B under A" (and the left/right, front/behind pairs) describe the same
geometry; they are different prompts with equal scenes.
"""

from __future__ import annotations

import functools
import math
import random
import zlib
from collections.abc import Iterable, Sequence

from asd3d.world.primitives import PRIMITIVES
from asd3d.world.scene import SceneObject, SceneSpec

SIZES: tuple[tuple[str, float], ...] = (("small", 0.18), ("medium", 0.25), ("large", 0.32))
"""Size words and their scales (world units per unit primitive)."""

COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    # Well separated from each other and from the white background (no white, no grey).
    ("red", (0.86, 0.12, 0.12)),
    ("orange", (0.96, 0.50, 0.08)),
    ("yellow", (0.95, 0.88, 0.15)),
    ("green", (0.15, 0.65, 0.20)),
    ("cyan", (0.10, 0.80, 0.85)),
    ("blue", (0.12, 0.25, 0.85)),
    ("purple", (0.52, 0.18, 0.72)),
    ("pink", (0.96, 0.50, 0.75)),
    ("brown", (0.50, 0.30, 0.12)),
    ("black", (0.10, 0.10, 0.10)),
)
"""Colour words and their RGB in [0, 1]."""

SHAPES: tuple[str, ...] = tuple(p.name for p in PRIMITIVES)
"""Shape words (``asd3d.world.primitives``)."""

_HORIZONTAL_GAP = 0.06
_DIAGONAL = 1.0 / math.sqrt(2.0)
RELATIONS: tuple[tuple[str, tuple[float, float, float], float], ...] = (
    ("on top of", (0.0, 0.0, 1.0), 0.0),
    ("under", (0.0, 0.0, -1.0), 0.0),
    ("to the left of", (0.0, -1.0, 0.0), _HORIZONTAL_GAP),
    ("to the right of", (0.0, 1.0, 0.0), _HORIZONTAL_GAP),
    ("in front of", (1.0, 0.0, 0.0), _HORIZONTAL_GAP),
    ("behind", (-1.0, 0.0, 0.0), _HORIZONTAL_GAP),
    ("next to", (_DIAGONAL, _DIAGONAL, 0.0), _HORIZONTAL_GAP),
)
"""Relation phrases: direction of the first object as seen from the second, and the gap."""

MAX_OBJECTS = 3
MAX_RADIUS = 0.8
NUM_OBJECT_CODES = len(SIZES) * len(COLOURS) * len(SHAPES)  # 240

_SIZE_IDS = {name: i for i, (name, _) in enumerate(SIZES)}
_COLOUR_IDS = {name: i for i, (name, _) in enumerate(COLOURS)}
_SHAPE_IDS = {name: i for i, name in enumerate(SHAPES)}
_RELATION_WORDS = {tuple(phrase.split()): i for i, (phrase, _, _) in enumerate(RELATIONS)}

# A prompt as digits: object codes (k of them) and relation ids (k - 1).
Terms = tuple[tuple[int, ...], tuple[int, ...]]
# Lateral offset coefficients in [-1, 1], per relation one per lateral axis (lateral_axes).
Offsets = tuple[tuple[float, ...], ...]


def lateral_axes(relation: int) -> tuple[tuple[float, float, float], ...]:
    """Unit directions across relation ``relation`` along which its object may slide: the two
    horizontal axes for vertical relations, the other horizontal axis (or diagonal) otherwise."""
    dx, dy, dz = RELATIONS[relation][1]
    if abs(dz) > 0.5:
        return ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    if abs(dx) > 1e-9 and abs(dy) > 1e-9:
        return ((-_DIAGONAL, _DIAGONAL, 0.0),)
    return ((0.0, 1.0, 0.0),) if abs(dx) > 1e-9 else ((1.0, 0.0, 0.0),)


def block_size(count: int) -> int:
    """Number of prompts with ``count`` objects."""
    return NUM_OBJECT_CODES**count * len(RELATIONS) ** (count - 1)


def check_object_counts(object_counts: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique object counts; ValueError naming them unless each is in ``1..3``."""
    counts = tuple(sorted(set(int(c) for c in object_counts)))
    if not counts or any(c < 1 or c > MAX_OBJECTS for c in counts):
        raise ValueError(
            f"object_counts={list(object_counts)} must be a non-empty subset of "
            f"{list(range(1, MAX_OBJECTS + 1))}"
        )
    return counts


def prompt_space_size(object_counts: Iterable[int]) -> int:
    """``M``, the number of distinct prompts with the given object counts."""
    return sum(block_size(c) for c in check_object_counts(object_counts))


def object_phrase(code: int) -> str:
    """``"a <size> <colour> <shape>"`` of an object code in ``[0, 240)``."""
    rest, size = divmod(code, len(SIZES))
    shape, colour = divmod(rest, len(COLOURS))
    return f"a {SIZES[size][0]} {COLOURS[colour][0]} {SHAPES[shape]}"


def terms_text(terms: Terms) -> str:
    """The prompt text of a digit tuple."""
    objects, relations = terms
    words = [object_phrase(objects[0])]
    for relation, code in zip(relations, objects[1:], strict=True):
        words += [RELATIONS[relation][0], object_phrase(code)]
    return " ".join(words)


def parse_terms(text: str) -> Terms:
    """The digits of a prompt text (case and extra whitespace are ignored).

    Raises ValueError, one line naming the text and the first word that does not fit.
    """
    words = text.lower().split()
    objects: list[int] = []
    relations: list[int] = []
    pos = 0

    def fail(expected: str) -> ValueError:
        got = repr(words[pos]) if pos < len(words) else "the end of the text"
        return ValueError(
            f"{text!r} is not a procedural prompt: expected {expected} at word {pos + 1}, got {got}"
        )

    while True:
        if pos >= len(words) or words[pos] != "a":
            raise fail("'a'")
        pos += 1
        ids = []
        for table, what in (
            (_SIZE_IDS, "a size"),
            (_COLOUR_IDS, "a colour"),
            (_SHAPE_IDS, "a shape"),
        ):
            if pos >= len(words) or words[pos] not in table:
                raise fail(f"{what} ({'/'.join(table)})")
            ids.append(table[words[pos]])
            pos += 1
        size, colour, shape = ids
        objects.append((shape * len(COLOURS) + colour) * len(SIZES) + size)
        if pos == len(words):
            break
        if len(objects) == MAX_OBJECTS:
            raise fail(f"the end of the text (at most {MAX_OBJECTS} objects)")
        for length in (4, 3, 2, 1):  # longest relation phrase first
            relation = _RELATION_WORDS.get(tuple(words[pos : pos + length]))
            if relation is not None:
                relations.append(relation)
                pos += length
                break
        else:
            raise fail(f"a relation ({'/'.join(p for p, _, _ in RELATIONS)})")
    return tuple(objects), tuple(relations)


def _place(
    anchor: Sequence[float],
    direction: Sequence[float],
    gap: float,
    group_lo: Sequence[float],
    group_hi: Sequence[float],
    half: Sequence[float],
) -> tuple[float, float, float]:
    """Centre of a box of half extents ``half`` moved from ``anchor`` along ``direction`` just
    far enough to clear the group box by ``gap`` along at least one axis."""
    best = math.inf
    for k in range(3):
        u = direction[k]
        if abs(u) < 1e-9:
            continue
        # Clear the group's face on the side we move towards.
        face = group_hi[k] + half[k] + gap if u > 0 else group_lo[k] - half[k] - gap
        best = min(best, (face - anchor[k]) / u)
    t = max(best, 0.0)
    return (
        anchor[0] + direction[0] * t,
        anchor[1] + direction[1] * t,
        anchor[2] + direction[2] * t,
    )


def _lateral_reach(direction: Sequence[float], first_half: float, second_half: float) -> float:
    """Largest lateral offset a relation allows along one axis, given the half extents there of
    the related objects (module docstring)."""
    if abs(direction[2]) > 0.5:  # vertical: the lower object's footprint
        return second_half if direction[2] > 0 else first_half
    return max(first_half, second_half)


def layout(terms: Terms, offsets: Offsets | None = None) -> SceneSpec:
    """The scene of a prompt's digits (placement rules in the module docstring), with the
    anchors of its relations slid by ``offsets`` (``None``: the canonical layout)."""
    objects, relations = terms
    if offsets is not None and len(offsets) != len(relations):
        raise ValueError(f"{len(offsets)} offsets for {len(relations)} relations")
    words = []
    for code in objects:
        rest, size = divmod(code, len(SIZES))
        shape, colour = divmod(rest, len(COLOURS))
        words.append((SHAPES[shape], COLOURS[colour], SIZES[size]))
    halves = [
        tuple(e * size[1] for e in PRIMITIVES[_SHAPE_IDS[shape]].extent) for shape, _, size in words
    ]
    centres = [(0.0, 0.0, 0.0)]
    lo, hi = [-e for e in halves[0]], list(halves[0])
    for j, relation in enumerate(relations):
        _, direction, gap = RELATIONS[relation]
        # Object j is `relation` of object j + 1, so j + 1 lies opposite to the direction.
        opposite = tuple(-d for d in direction)
        anchor = centres[j]
        if offsets is not None:
            axes = lateral_axes(relation)
            if len(offsets[j]) != len(axes):
                raise ValueError(
                    f"relation {RELATIONS[relation][0]!r} takes {len(axes)} offset "
                    f"coefficients, got {len(offsets[j])}"
                )
            for coefficient, axis in zip(offsets[j], axes, strict=True):
                reach = min(
                    _lateral_reach(direction, halves[j][k], halves[j + 1][k])
                    for k in range(3)
                    if abs(axis[k]) > 1e-9
                )
                ax, ay, az = (
                    a + coefficient * reach * u for a, u in zip(anchor, axis, strict=True)
                )
                anchor = (ax, ay, az)
        centre = _place(anchor, opposite, gap, lo, hi, halves[j + 1])
        centres.append(centre)
        lo = [min(lo[k], centre[k] - halves[j + 1][k]) for k in range(3)]
        hi = [max(hi[k], centre[k] + halves[j + 1][k]) for k in range(3)]
    mid = [(a + b) / 2.0 for a, b in zip(lo, hi, strict=True)]
    centres = [(c[0] - mid[0], c[1] - mid[1], c[2] - mid[2]) for c in centres]
    # Shrink only scenes whose object boxes reach past MAX_RADIUS.
    reach = max(
        math.sqrt(sum((abs(c[k]) + h[k]) ** 2 for k in range(3)))
        for c, h in zip(centres, halves, strict=True)
    )
    shrink = min(1.0, MAX_RADIUS / reach)
    return SceneSpec(
        tuple(
            SceneObject(
                shape=shape,
                colour=colour[0],
                rgb=colour[1],
                size=size[0],
                scale=size[1] * shrink,
                position=(c[0] * shrink, c[1] * shrink, c[2] * shrink),
            )
            for (shape, colour, size), c in zip(words, centres, strict=True)
        )
    )


@functools.lru_cache(maxsize=1 << 16)
def parse(text: str) -> SceneSpec:
    """The scene of any procedural prompt (1 to 3 objects); ValueError naming the text if it is
    not in the grammar. Cached: priors parse the same prompts at every step."""
    return layout(parse_terms(text))


class PromptGrammar:
    """Bijection between ``[0, M)`` and the prompts with the allowed object counts.

    Args:
        object_counts: how many objects a prompt may name (subset of ``1..3``).
    """

    def __init__(self, object_counts: Iterable[int] = (1, 2, 3)) -> None:
        self.object_counts = check_object_counts(object_counts)
        # First index of each object count's block, in increasing count.
        self._starts: dict[int, int] = {}
        start = 0
        for count in self.object_counts:
            self._starts[count] = start
            start += block_size(count)
        self.size = start

    def __len__(self) -> int:
        return self.size

    def terms(self, index: int) -> Terms:
        """The digits of prompt ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(
                f"prompt index {index} outside [0, {self.size}) of the grammar with "
                f"object_counts={list(self.object_counts)}"
            )
        count = max(c for c, start in self._starts.items() if start <= index)
        rest = index - self._starts[count]
        objects, relations = [], []
        for j in range(count):
            rest, code = divmod(rest, NUM_OBJECT_CODES)
            objects.append(code)
            if j < count - 1:
                rest, relation = divmod(rest, len(RELATIONS))
                relations.append(relation)
        return tuple(objects), tuple(relations)

    def decode(self, index: int) -> str:
        """The text of prompt ``index``."""
        return terms_text(self.terms(index))

    def scene(self, index: int) -> SceneSpec:
        """The scene of prompt ``index``."""
        return layout(self.terms(index))

    def encode(self, text: str) -> int:
        """The index of a prompt text (inverse of ``decode``); ValueError if not in the grammar."""
        objects, relations = parse_terms(text)
        count = len(objects)
        if count not in self._starts:
            raise ValueError(
                f"{text!r} names {count} objects; this grammar allows "
                f"object_counts={list(self.object_counts)}"
            )
        index = 0
        for j in reversed(range(count)):
            if j < count - 1:
                index = index * len(RELATIONS) + relations[j]
            index = index * NUM_OBJECT_CODES + objects[j]
        return self._starts[count] + index

    def parse(self, text: str) -> SceneSpec:
        """The scene of a prompt text allowed by this grammar."""
        self.encode(text)  # validates the object count
        return parse(text)


ATTRIBUTE_SLOTS = ("size", "colour", "shape")
"""The attributes of an object a one-attribute change may alter (besides a relation)."""


def one_attribute_changes(text: str, count: int, seed: int) -> list[str]:
    """``count`` distinct prompts that differ from ``text`` in exactly one attribute.

    The slots are visited in turn (each object's size, colour and shape, then each relation;
    around again when ``count`` exceeds their number) and each visit draws a value the slot does
    not already hold, without repeating a prompt; draws depend only on ``text`` and ``seed``.
    These are the hardest distractors for retrieval: a sample names its prompt against them only
    if it gets every attribute right.
    """
    objects, relations = parse_terms(text)
    slots = [(j, a) for j in range(len(objects)) for a in range(len(ATTRIBUTE_SLOTS))]
    slots += [(j, -1) for j in range(len(relations))]
    choices = {(j, a): _alternatives(objects, relations, j, a) for j, a in slots}
    total = sum(len(values) for values in choices.values())
    if not 0 <= count <= total:
        raise ValueError(f"{text!r} has {total} one-attribute changes; asked for {count}")
    rng = random.Random(zlib.crc32(f"{seed}|{text}".encode()))
    for values in choices.values():
        rng.shuffle(values)
    changed: list[str] = []
    turn = 0
    while len(changed) < count:
        values = choices[slots[turn % len(slots)]]
        turn += 1
        if values:
            changed.append(terms_text(values.pop()))
    return changed


def _alternatives(
    objects: tuple[int, ...], relations: tuple[int, ...], j: int, attribute: int
) -> list[Terms]:
    """Every prompt with object ``j``'s ``attribute`` (or relation ``j``, ``attribute = -1``)
    changed to another value."""
    if attribute < 0:
        return [
            (objects, relations[:j] + (r,) + relations[j + 1 :])
            for r in range(len(RELATIONS))
            if r != relations[j]
        ]
    rest, size = divmod(objects[j], len(SIZES))
    shape, colour = divmod(rest, len(COLOURS))
    digits = [size, colour, shape]
    out = []
    for value in range((len(SIZES), len(COLOURS), len(SHAPES))[attribute]):
        if value == digits[attribute]:
            continue
        new = list(digits)
        new[attribute] = value
        code = (new[2] * len(COLOURS) + new[1]) * len(SIZES) + new[0]
        out.append((objects[:j] + (code,) + objects[j + 1 :], relations))
    return out
