"""A deterministic, offline text encoder with CLIP-like outputs for the procedural world.

Tokens are lower-cased words and punctuation marks. Every word gets a fixed Gaussian vector
seeded by ``crc32(word)`` and the encoder's seed (never Python's salted ``hash``), so the same
text gives the same embedding in every process and on every machine. The token states are
``LayerNorm(word + position)`` (a start token, the words, an end token, then padding tokens up
to ``max_tokens``), each with zero mean and unit variance per element like the last hidden
states of CLIP's text tower.

The pooled vector must tell "a red cube on top of a blue sphere" from "a blue cube on top of a
red sphere", which a bag of words cannot. Each position ``i`` owns a fixed random signed
permutation ``Q_i`` (a permutation of the ``D`` coordinates followed by random sign flips), and
``pooled = LayerNorm(sum_i Q_i word_i)`` over the start, word and end tokens: swapping two words
changes two near-orthogonal terms, and each (word, position) pair stays linearly decodable from
the sum, which is what a generator conditioned on it needs. As in CLIP the pooled vector is also
the end token's state (SD's "EOS state").
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.types import TextEmbedding

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_START, _END, _PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
# Positional vectors are weaker than word vectors so that a token state is mostly its word.
_POSITION_WEIGHT = 0.5


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks of ``text``."""
    return _TOKEN.findall(text.lower())


def _layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)


class ProceduralTextEncoder:
    """Seeded word vectors plus positions, with a position-bound pooled vector.

    Args:
        dim: embedding width ``D`` (1024 like SD 2.x's OpenCLIP text tower).
        max_tokens: sequence length ``L`` including start and end tokens (77 like CLIP); longer
            texts are truncated.
        seed: changes every word, position and permutation vector.
        cache_size: how many word vectors to keep (least recently used are dropped).
        device: where the returned embeddings live.
    """

    def __init__(
        self,
        dim: int = 1024,
        max_tokens: int = 77,
        seed: int = 0,
        cache_size: int = 4096,
        device: torch.device | str = "cpu",
    ) -> None:
        if dim < 2 or max_tokens < 3:
            raise ValueError(
                f"ProceduralTextEncoder needs dim >= 2 and max_tokens >= 3, got "
                f"dim={dim}, max_tokens={max_tokens}"
            )
        self.dim, self.max_tokens, self.seed = int(dim), int(max_tokens), int(seed)
        self.cache_size = int(cache_size)
        self.device = torch.device(device)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        rng = torch.Generator().manual_seed(self._mix(b"<|positions|>"))
        self.positions = torch.randn(self.max_tokens, self.dim, generator=rng)
        self.signs = torch.randint(0, 2, (self.max_tokens, self.dim), generator=rng) * 2.0 - 1.0
        self.permutations = torch.stack(
            [torch.randperm(self.dim, generator=rng) for _ in range(self.max_tokens)]
        )

    def _mix(self, key: bytes) -> int:
        # Stable across processes (crc32, not hash()), and different per encoder seed.
        return (zlib.crc32(key) + 0x9E3779B1 * (self.seed + 1)) % (1 << 63)

    def word_vector(self, word: str) -> Float[Tensor, "D"]:
        """The fixed ``N(0, I)`` vector of a token (cached)."""
        vector = self._cache.get(word)
        if vector is not None:
            self._cache.move_to_end(word)
            return vector
        rng = torch.Generator().manual_seed(self._mix(word.encode("utf-8")))
        vector = torch.randn(self.dim, generator=rng)
        self._cache[word] = vector
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vector

    def token_ids(self, texts: list[str]) -> tuple[list[str], Tensor, Tensor]:
        """Vocabulary of the batch, ``P x L`` indices into it and the number of real tokens
        (start + words + end) per text."""
        vocab: dict[str, int] = {_PAD: 0, _START: 1, _END: 2}
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode takes strings, got {type(text).__name__}: {text!r}")
            words = tokenize(text)[: self.max_tokens - 2]
            sequence = [_START, *words, _END]
            for col, word in enumerate(sequence):
                ids[row, col] = vocab.setdefault(word, len(vocab))
            lengths[row] = len(sequence)
        return list(vocab), ids, lengths

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Token states ``P x L x D`` and pooled vectors ``P x D`` (both per-element unit scale)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, got a single string")
        vocab, ids, lengths = self.token_ids(list(texts))
        table = torch.stack([self.word_vector(word) for word in vocab])  # V x D
        words = table[ids]  # P x L x D
        tokens = _layer_norm(words + _POSITION_WEIGHT * self.positions)
        # Position-bound sum: coordinate d of Q_i w is sign_i[d] * w[perm_i[d]].
        # Only the first ``longest`` positions hold real tokens; padding is left out of the sum.
        longest = int(lengths.max())
        bound = torch.gather(
            words[:, :longest], 2, self.permutations[:longest].expand(len(ids), -1, -1)
        )
        bound = bound * self.signs[:longest]
        real = torch.arange(longest) < lengths.unsqueeze(1)  # P x longest
        pooled = _layer_norm((bound * real.unsqueeze(-1)).sum(dim=1))
        # CLIP's pooled output is the end token's state.
        end = (lengths - 1).view(-1, 1, 1).expand(-1, 1, self.dim)
        tokens = tokens.scatter(1, end, pooled.unsqueeze(1))
        return TextEmbedding(tokens=tokens.to(self.device), pooled=pooled.to(self.device))

    def to(self, device: torch.device | str) -> ProceduralTextEncoder:
        """Return embeddings on ``device`` from now on (the tables stay on the CPU: they are
        gathered per call and tiny)."""
        self.device = torch.device(device)
        return self

    def __call__(self, texts: list[str]) -> TextEmbedding:
        return self.encode(texts)
