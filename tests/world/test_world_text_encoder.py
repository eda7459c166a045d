"""The procedural text encoder: deterministic, offline, CLIP-shaped, sensitive to word order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from asd3d.types import TextEmbedding
from asd3d.world.text_encoder import ProceduralTextEncoder, tokenize

A = "a red cube on top of a blue sphere"
B = "a blue cube on top of a red sphere"


@pytest.fixture(scope="module")
def encoder() -> ProceduralTextEncoder:
    return ProceduralTextEncoder(dim=1024, max_tokens=77, seed=0)


def test_shapes_and_scale(encoder):
    out = encoder.encode([A, "", "a small red cube"])
    assert isinstance(out, TextEmbedding)
    assert out.tokens.shape == (3, 77, 1024) and out.pooled.shape == (3, 1024)
    assert out.tokens.dtype == torch.float32 and torch.isfinite(out.tokens).all()
    # Per-element unit scale, like CLIP's final layer norm.
    torch.testing.assert_close(out.tokens.std(dim=-1), torch.ones(3, 77), atol=1e-2, rtol=0)
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.full((3,), 32.0), atol=0.1, rtol=0)
    # The pooled vector is the end token's state (start + 4 words + end: position 5).
    torch.testing.assert_close(out.tokens[2, 5], out.pooled[2])


def test_deterministic_across_instances_and_processes(encoder):
    first = encoder.encode([A, B])
    again = ProceduralTextEncoder(dim=1024, max_tokens=77, seed=0).encode([B, A])
    assert torch.equal(first.pooled, again.pooled.flip(0))
    assert torch.equal(first.tokens, again.tokens.flip(0))
    # Another process (hash randomisation differs) gives the same numbers.
    code = (
        "from asd3d.world.text_encoder import ProceduralTextEncoder as E;"
        f"print(E().encode([{A!r}]).pooled[0, :4].tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"},
    )
    assert eval(out.stdout) == pytest.approx(first.pooled[0, :4].tolist(), abs=1e-6)


def test_seed_changes_everything(encoder):
    other = ProceduralTextEncoder(seed=1).encode([A]).pooled[0]
    assert F.cosine_similarity(encoder.encode([A]).pooled[0], other, dim=0).abs() < 0.2


def test_word_order_changes_the_pooled_vector(encoder):
    pooled = encoder.encode(
        [
            A,
            B,
            A + " ",
            "a large blue sphere on top of a small red cube",
            "a small red cube on top of a large blue sphere",
        ]
    ).pooled
    swapped = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert swapped < 0.9  # two of ten terms differ
    assert torch.equal(pooled[0], pooled[2])  # whitespace is not a token
    assert F.cosine_similarity(pooled[3], pooled[4], dim=0) < 0.7
    # Tokens differ exactly where the words differ.
    tokens = encoder.encode([A, B]).tokens
    same = (tokens[0] - tokens[1]).abs().amax(dim=-1) < 1e-6
    assert same.tolist()[:10] == [True, True, False, True, True, True, True, True, False, True]


def test_padding_truncation_and_tokenizer(encoder):
    out = encoder.encode(["a cube", "a sphere"])
    # Padding after the end token is the same for texts of equal length.
    assert torch.equal(out.tokens[0, 4:], out.tokens[1, 4:])
    long = " ".join(["cube"] * 200)
    assert encoder.encode([long]).tokens.shape == (1, 77, 1024)
    assert tokenize("A Red-cube, on top!") == ["a", "red", "-", "cube", ",", "on", "top", "!"]


def test_word_cache_is_bounded():
    small = ProceduralTextEncoder(dim=8, cache_size=3)
    small.encode(["one two three four five"])
    assert len(small._cache) == 3
    vector = small.word_vector("one")  # regenerated identically after eviction
    assert torch.equal(vector, ProceduralTextEncoder(dim=8).word_vector("one"))


def test_bad_inputs(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode(A)
    with pytest.raises(TypeError, match="got int"):
        encoder.encode([A, 3])
    with pytest.raises(ValueError, match="dim=1"):
        ProceduralTextEncoder(dim=1)
