"""The procedural corpus: seeded, O(1) per prompt, disjoint held-out split, clear errors."""

from __future__ import annotations

import random
import time

import pytest

from asd3d.corpus.procedural import FeistelPermutation, ProceduralCorpus
from asd3d.world.grammar import PromptGrammar, parse


@pytest.mark.parametrize("size", [1, 2, 3, 240, 1000, 4097])
def test_feistel_is_a_bijection(size):
    perm = FeistelPermutation(size, seed=7)
    assert sorted(perm(i) for i in range(size)) == list(range(size))


def test_feistel_depends_on_seed_and_looks_shuffled():
    a = [FeistelPermutation(403_200, 0)(i) for i in range(100)]
    b = [FeistelPermutation(403_200, 1)(i) for i in range(100)]
    assert a != b and a != sorted(a)


def test_million_prompts_in_constant_memory():
    corpus = ProceduralCorpus(1_000_000, 1000, "heldout", object_counts=[2, 3], seed=0)
    start = time.perf_counter()
    last = corpus.prompt("train", 999_999)
    assert time.perf_counter() - start < 0.05  # no materialised list: one index is instant
    assert parse(last) == corpus.scene("train", 999_999)
    sample = random.Random(0).sample(range(1_000_000), 10_000)
    texts = corpus.prompts("train", sample)
    assert len(set(texts)) == len(texts)
    again = ProceduralCorpus(1_000_000, 1000, "heldout", object_counts=[2, 3], seed=0)
    assert again.prompts("train", sample[:100]) == texts[:100]
    other = ProceduralCorpus(1_000_000, 1000, "heldout", object_counts=[2, 3], seed=1)
    assert other.prompts("train", sample[:100]) != texts[:100]


def test_splits():
    heldout = ProceduralCorpus(500, 50, "heldout", object_counts=[1, 2])
    train = set(heldout.prompts("train", range(500)))
    test = heldout.prompts("test", range(50))
    assert len(train) == 500 and not train & set(test)
    assert heldout.prompts("val", range(50)) == test
    assert heldout.size("train") == 500 and heldout.size("val") == heldout.size("test") == 50
    in_dist = ProceduralCorpus(500, 50, "train", object_counts=[1, 2])
    assert in_dist.prompts("test", range(50)) == in_dist.prompts("train", range(50))
    assert set(in_dist.prompts("train", range(500))) == train  # same seed, same prompts


def test_whole_space_is_covered():
    corpus = ProceduralCorpus(240, 1, "train", object_counts=[1])
    assert set(corpus.prompts("train", range(240))) == {
        PromptGrammar([1]).decode(i) for i in range(240)
    }


def test_config_defaults_shape():
    corpus = ProceduralCorpus(16, 16, "train", [2], 0)
    assert corpus.size("train") == 16 and corpus.name == "procedural"
    assert all(len(corpus.scene("train", i)) == 2 for i in range(16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prompts=403_201, num_test_prompts=1), "exceeds the 403200 distinct prompts"),
        (
            dict(num_prompts=403_200, num_test_prompts=1, test_split="heldout"),
            r"num_prompts \+ num_test_prompts = 403201",
        ),
        (dict(num_prompts=10, num_test_prompts=11), "num_test_prompts=11 exceeds num_prompts=10"),
        (dict(num_prompts=0, num_test_prompts=1), "num_prompts=0"),
        (dict(num_prompts=2.5, num_test_prompts=1), "num_prompts=2.5"),
        (dict(num_prompts=10, num_test_prompts=0), "num_test_prompts=0"),
        (dict(num_prompts=10, num_test_prompts=1, test_split="val"), "test_split='val'"),
        (dict(num_prompts=10, num_test_prompts=1, object_counts=[0, 2]), r"object_counts=\[0, 2\]"),
        (dict(num_prompts=10, num_test_prompts=1, object_counts=[]), r"object_counts=\[\]"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ProceduralCorpus(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_split_and_index():
    corpus = ProceduralCorpus(10, 2)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.prompt("dev", 0)
    with pytest.raises(IndexError, match=r"prompt index 10 outside \[0, 10\)"):
        corpus.prompt("train", 10)
    with pytest.raises(IndexError, match=r"outside \[0, 2\) of split 'test'"):
        corpus.scene("test", 2)


def test_unseen_pairs_split_holds_out_object_combinations_not_objects():
    from asd3d.corpus.procedural import has_heldout_pair

    corpus = ProceduralCorpus(3000, 200, "unseen_pairs", object_counts=[2], seed=0)
    train = corpus.prompts("train", range(3000))
    test = corpus.prompts("test", range(200))
    assert not set(train) & set(test)

    def pairs(texts):
        out = set()
        for text in texts:
            objects = PromptGrammar([2]).terms(PromptGrammar([2]).encode(text))[0]
            out.add(tuple(sorted(objects)))
        return out

    assert not pairs(train) & pairs(test)  # no test pair ever appears in train
    test_objects = {o for pair in pairs(test) for o in pair}
    train_objects = {o for pair in pairs(train) for o in pair}
    assert len(test_objects - train_objects) <= 2  # test objects are (nearly all) known
    for text in test:
        objects = PromptGrammar([2]).terms(PromptGrammar([2]).encode(text))[0]
        assert has_heldout_pair(objects, 0, 0.1)
    with pytest.raises(ValueError, match="heldout_pair_fraction"):
        ProceduralCorpus(10, 2, "unseen_pairs", heldout_pair_fraction=1.0)
    with pytest.raises(ValueError, match="object pairs"):
        ProceduralCorpus(10, 2, "unseen_pairs", object_counts=[1])
