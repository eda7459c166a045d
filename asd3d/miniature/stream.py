"""A stream of fresh ground-truth renders for training a grammar-wide miniature prior.

A prior meant to generalise over the whole grammar must see far more prompts than a fixed cache
can hold, so the images are rendered while training: a replay buffer of ``buffer_chunks``
chunks of ``chunk_size`` renders, one chunk replaced every ``refresh_every_n_steps`` optimizer
steps (oldest first). Each image is a random train prompt of the corpus, seen from a random
camera of the sampler, in a random one of the world's valid scenes (``ground_truth.variants``).

Chunk ``c`` depends only on ``(seed, c)``: after ``step`` optimizer steps the buffer holds
chunks ``[n - buffer_chunks, n)`` with ``n = buffer_chunks + step // refresh_every_n_steps``, so
a resumed run re-renders exactly the buffer it stopped with, from nothing but its step.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from asd3d.cameras import CameraSampler
from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.world.ground_truth import GroundTruthRenderer

_CHUNK_SEED_STRIDE = 1_000_003  # chunk c of seed s draws from seed s * stride + c


class RenderStream:
    """Replay buffer of ground-truth renders refreshed while training.

    Args:
        corpus: its train prompts are drawn uniformly.
        cameras: the training camera distribution.
        ground_truth: renders the scenes (and holds the world's variants).
        resolution: image side.
        seed: selects every chunk's prompts, cameras and variants.
        chunk_size: renders per chunk (rendered together).
        buffer_chunks: chunks held at once (``len(self) = chunk_size * buffer_chunks``).
        refresh_every_n_steps: optimizer steps between two new chunks.
    """

    def __init__(
        self,
        corpus: ProceduralCorpus,
        cameras: CameraSampler,
        ground_truth: GroundTruthRenderer,
        resolution: int,
        seed: int,
        chunk_size: int,
        buffer_chunks: int,
        refresh_every_n_steps: int,
    ) -> None:
        for key, value in (
            ("chunk_size", chunk_size),
            ("buffer_chunks", buffer_chunks),
            ("refresh_every_n_steps", refresh_every_n_steps),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"data.stream.{key}={value!r} must be an integer >= 1")
        self.corpus, self.cameras, self.ground_truth = corpus, cameras, ground_truth
        self.resolution, self.seed = int(resolution), int(seed)
        self.chunk_size, self.buffer_chunks = int(chunk_size), int(buffer_chunks)
        self.refresh_every_n_steps = int(refresh_every_n_steps)
        size = self.chunk_size * self.buffer_chunks
        self.images: Int[Tensor, "B 3 r r"] = torch.zeros(
            size, 3, self.resolution, self.resolution, dtype=torch.uint8
        )
        self.texts: list[str] = [""] * size
        self.camera_codes: Float[Tensor, "B 16"] = torch.zeros(size, 16)
        self.fovy: Float[Tensor, "B"] = torch.zeros(size)
        self.rendered = 0  # chunks rendered so far (the data cursor)

    def __len__(self) -> int:
        return self.images.shape[0]

    def chunks_at(self, step: int) -> int:
        """Chunks rendered once ``step`` optimizer steps have run."""
        return self.buffer_chunks + step // self.refresh_every_n_steps

    def start(self, step: int) -> None:
        """Fill the buffer as it is after ``step`` steps (0: a new run; else a resumed one)."""
        last = self.chunks_at(step)
        first = max(0, last - self.buffer_chunks)
        for chunk in tqdm(range(first, last), desc="rendering replay buffer", unit="chunk"):
            self._render_into_buffer(chunk)
        self.rendered = last

    def advance(self, step: int) -> None:
        """Render the chunks due by ``step`` (called after every optimizer step)."""
        while self.rendered < self.chunks_at(step):
            self._render_into_buffer(self.rendered)
            self.rendered += 1

    def chunk(
        self, index: int
    ) -> tuple[Int[Tensor, "C 3 r r"], list[str], Float[Tensor, "C 16"], Float[Tensor, "C"]]:
        """Chunk ``index``: uint8 renders, their prompt texts, camera codes and fields of view."""
        generator = torch.Generator().manual_seed(self.seed * _CHUNK_SEED_STRIDE + index)
        size = self.chunk_size
        prompt_ids = torch.randint(self.corpus.size("train"), (size,), generator=generator)
        texts = self.corpus.prompts("train", prompt_ids.tolist())
        # One view per draw: index() keeps the first ``size`` views, one per image.
        sampled = self.cameras.sample(size, generator).index(torch.arange(size))
        variants = torch.randint(self.ground_truth.num_variants, (size,), generator=generator)
        rgb = self.ground_truth(texts, sampled, self.resolution, variants.tolist()).rgb
        images = (rgb.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return images, texts, sampled.flat_matrix().contiguous(), sampled.fovy

    def batch(
        self, index: Int[Tensor, "B"]
    ) -> tuple[Float[Tensor, "B 3 r r"], list[str], Float[Tensor, "B 16"], Float[Tensor, "B"]]:
        """Buffer rows ``index``: images in ``[-1, 1]``, texts, camera codes, fields of view."""
        images = self.images[index].float() / 127.5 - 1.0
        texts = [self.texts[i] for i in index.tolist()]
        return images, texts, self.camera_codes[index], self.fovy[index]

    def _render_into_buffer(self, chunk: int) -> None:
        images, texts, codes, fovy = self.chunk(chunk)
        start = (chunk % self.buffer_chunks) * self.chunk_size
        rows = slice(start, start + self.chunk_size)
        self.images[rows], self.camera_codes[rows], self.fovy[rows] = images, codes, fovy
        self.texts[rows] = texts
