"""The procedural corpus: compositional prompts whose 3D scenes are known exactly.

Prompt ``i`` of train is ``grammar.decode(perm(i))`` for a seeded pseudo-random bijection
``perm`` of the grammar's prompt space ``[0, M)``; held-out test prompts are the next ones of the
same permutation, so they are disjoint from train. ``perm`` is a balanced Feistel network on the
smallest ``2^(2h) >= M`` with cycle walking (re-apply until the value falls inside ``[0, M)``;
fewer than 4 rounds trips on average): O(1) time and memory per index, so a corpus of millions
of prompts (up to ``M``, 677,779,440 with object counts 1 to 3) costs nothing to hold.

``test_split="unseen_pairs"`` holds out object *combinations* instead: a fixed
``heldout_pair_fraction`` of the unordered pairs of object codes (size, colour and shape) is
chosen by a hash of the pair, train prompts are the permutation's prompts none of whose object
pairs is held out, and test prompts are the permutation's prompts with a held-out pair. Every
object also occurs in train, only never together with its held-out partners, so test measures
composition, not vocabulary. These splits are the permutation filtered in order, computed once
up to the largest index asked for (O(index) the first time, then O(1)).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from asd3d.corpus.base import Corpus, check_split
from asd3d.world.grammar import PromptGrammar
from asd3d.world.scene import SceneSpec

_MASK64 = (1 << 64) - 1
_ROUNDS = 6  # a few more than the 3-4 a Feistel permutation needs, to mix small domains well


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a fast, well-mixing bijection on 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class FeistelPermutation:
    """A seeded bijection of ``[0, size)`` evaluated in O(1) per index.

    Args:
        size: the domain size ``M`` (>= 1).
        seed: selects the permutation.
    """

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"permutation size must be >= 1, got {size}")
        self.size = int(size)
        self.half_bits = max(1, ((self.size - 1).bit_length() + 1) // 2)
        self._mask = (1 << self.half_bits) - 1
        self._keys = [_mix64((int(seed) & _MASK64) * _ROUNDS + r) for r in range(_ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} outside [0, {self.size})")
        value = self._feistel(index)
        while value >= self.size:  # cycle walking stays inside [0, size) and stays bijective
            value = self._feistel(value)
        return value


def pair_is_heldout(first: int, second: int, seed: int, fraction: float) -> bool:
    """Whether the unordered pair of object codes ``{first, second}`` is held out."""
    low, high = sorted((int(first), int(second)))
    return zlib.crc32(f"pair|{seed}|{low}|{high}".encode()) < fraction * 2**32


def has_heldout_pair(objects: tuple[int, ...], seed: int, fraction: float) -> bool:
    """Whether any two of a prompt's objects form a held-out pair."""
    return any(
        pair_is_heldout(objects[i], objects[j], seed, fraction)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
    )


class ProceduralCorpus(Corpus):
    """Prompts of the procedural world, generated on demand from a seed.

    Args:
        num_prompts: train prompts ``N`` (at most ``M``, the grammar's prompt-space size).
        num_test_prompts: test prompts (val = test).
        test_split: ``"train"``: the first ``num_test_prompts`` train prompts (in-distribution,
            like the paper's MG15/DF415 evaluation); ``"heldout"``: the next ``num_test_prompts``
            prompts of the permutation, disjoint from train; ``"unseen_pairs"``: prompts with an
            object pair that no train prompt has (module docstring).
        heldout_pair_fraction: share of object pairs held out with ``"unseen_pairs"``.
        object_counts: how many objects a prompt may name (subset of 1..3).
        seed: selects the permutation, i.e. which prompts and in which order.
        name: corpus name for logs.
    """

    def __init__(
        self,
        num_prompts: int,
        num_test_prompts: int,
        test_split: str = "train",
        object_counts: Iterable[int] = (2,),
        seed: int = 0,
        name: str = "procedural",
        heldout_pair_fraction: float = 0.1,
    ) -> None:
        self.grammar = PromptGrammar(object_counts)
        space = self.grammar.size
        counts = list(self.grammar.object_counts)
        if int(num_prompts) != num_prompts or num_prompts < 1:
            raise ValueError(f"num_prompts={num_prompts!r} must be a positive integer")
        if int(num_test_prompts) != num_test_prompts or num_test_prompts < 1:
            raise ValueError(f"num_test_prompts={num_test_prompts!r} must be a positive integer")
        if test_split not in ("train", "heldout", "unseen_pairs"):
            raise ValueError(
                f"test_split={test_split!r} must be 'train', 'heldout' or 'unseen_pairs'"
            )
        if test_split == "unseen_pairs" and not 0.0 < heldout_pair_fraction < 1.0:
            raise ValueError(
                f"heldout_pair_fraction={heldout_pair_fraction} must be in (0, 1) with "
                "test_split='unseen_pairs'"
            )
        if test_split == "unseen_pairs" and self.grammar.object_counts == (1,):
            raise ValueError(
                "test_split='unseen_pairs' needs prompts with two or more objects; "
                "object_counts=[1] has no object pairs"
            )
        if num_prompts > space:
            raise ValueError(
                f"num_prompts={num_prompts} exceeds the {space} distinct prompts with "
                f"object_counts={counts}; allow more objects (e.g. [2, 3])"
            )
        if test_split == "train" and num_test_prompts > num_prompts:
            raise ValueError(
                f"num_test_prompts={num_test_prompts} exceeds num_prompts="
                f"{num_prompts}; with test_split='train' test prompts are train prompts"
            )
        if test_split == "heldout" and num_prompts + num_test_prompts > space:
            raise ValueError(
                f"num_prompts + num_test_prompts = {num_prompts + num_test_prompts} "
                f"exceeds the {space} distinct prompts with object_counts={counts}; "
                f"allow more objects (e.g. [2, 3])"
            )
        self.num_prompts, self.num_test_prompts = int(num_prompts), int(num_test_prompts)
        self.test_split, self.seed, self.name = test_split, int(seed), name
        self.permutation = FeistelPermutation(space, self.seed)
        self.heldout_pair_fraction = float(heldout_pair_fraction)
        # Permutation positions of the train / test prompts found so far ("unseen_pairs").
        self._positions: dict[bool, list[int]] = {False: [], True: []}
        self._walked = 0

    def size(self, split: str) -> int:
        return self.num_prompts if check_split(split) == "train" else self.num_test_prompts

    def grammar_index(self, split: str, index: int) -> int:
        """Index in the grammar's prompt space of prompt ``index`` of ``split``."""
        index = self._check_index(split, index)
        if self.test_split == "unseen_pairs":
            return self.permutation(self._filtered_position(split != "train", index))
        if split != "train" and self.test_split == "heldout":
            index += self.num_prompts
        return self.permutation(index)

    def _filtered_position(self, heldout: bool, index: int) -> int:
        """Permutation position of the ``index``-th prompt with (or without) a held-out pair."""
        found = self._positions[heldout]
        while len(found) <= index:
            if self._walked == self.grammar.size:
                raise IndexError(
                    f"only {len(found)} prompts of the grammar "
                    f"{'have' if heldout else 'lack'} a held-out object pair; "
                    f"ask for fewer (num_prompts / num_test_prompts)"
                )
            position = self._walked
            self._walked += 1
            objects = self.grammar.terms(self.permutation(position))[0]
            is_heldout = has_heldout_pair(objects, self.seed, self.heldout_pair_fraction)
            self._positions[is_heldout].append(position)
        return found[index]

    def _prompt(self, split: str, index: int) -> str:
        return self.grammar.decode(self.grammar_index(split, index))

    def scene(self, split: str, index: int) -> SceneSpec:
        """The ground-truth scene of prompt ``index`` of ``split``."""
        return self.grammar.scene(self.grammar_index(split, index))
