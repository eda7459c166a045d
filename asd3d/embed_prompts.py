"""Precompute a prior's text embeddings of a corpus: ``python -m asd3d.embed_prompts``.

    python -m asd3d.embed_prompts prior=sd21_base corpus=dl17k
    torchrun --nproc_per_node=8 -m asd3d.embed_prompts prior=sd21_base corpus=cp100k

Every text the prior will encode during training (each prompt of the chosen splits, its
view-dependent variants, and the negative prompt) is encoded once by the prior's own text encoder
and tokenizer (loaded from the model directory) and written as fp16 rows of one file set
(:mod:`asd3d.prior.embedding_cache`). Under ``torchrun`` each process encodes every
``WORLD_SIZE``-th batch on its own GPU and writes its rows of the shared files (the output must be
on a file system all processes see). Train with ``prior.text_embeddings=<out>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from asd3d.build import resolve_device
from asd3d.cli import user_errors
from asd3d.corpus.base import Corpus, check_split
from asd3d.prior.embedding_cache import build_embedding_file


def corpus_texts(corpus: Corpus, splits: list[str], prior) -> Iterator[str]:
    """The texts ``prior`` encodes for the prompts of ``splits``, then its negative prompt."""
    for split in splits:
        for index in range(corpus.size(check_split(split))):
            yield from prior.embedding_texts(corpus.prompt(split, index))
    yield prior.negative_prompt


def embed_prompts(cfg: DictConfig) -> Path:
    """Build ``cfg.out`` from ``cfg.corpus`` and ``cfg.prior`` (this process' share under DDP)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(str(cfg.device), local_rank)
    barrier = lambda: None  # noqa: E731
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        barrier = dist.barrier  # type: ignore[assignment]
    corpus = instantiate(cfg.corpus)
    prior = instantiate(cfg.prior, text_cache_size=0)  # every text is encoded once: no LRU
    if not hasattr(prior, "embedding_texts"):
        raise ValueError(
            f"prior {type(prior).__name__} has no text-embedding file support; use prior=sd21_base, "
            "sd21 or mvdream"
        )
    prior.to(device)

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = prior.encode_text(texts)  # the very path training takes (fp16-rounded)
        return embedding.tokens, embedding.pooled

    return build_embedding_file(
        cfg.out,
        corpus_texts(corpus, list(cfg.splits), prior),
        encode,
        model=prior.pretrained,
        batch_size=int(cfg.batch_size),
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        progress=bool(cfg.progress),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="embed_prompts")
def main(cfg: DictConfig) -> None:
    with user_errors():
        out = embed_prompts(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"text embeddings written to {out}; train with prior.text_embeddings={out}")


if __name__ == "__main__":
    main()
