"""A map-style dataset of prompt ids and texts, and its collate function.

Items are ``(index, text)``: the corpus stays the only owner of prompts, and text embeddings are
filled in later by the system (from the prior's encoder or an embedding cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from asd3d.corpus.base import Corpus, check_split
from asd3d.types import PromptBatch


class PromptDataset(Dataset):
    """The prompts of one split of a corpus.

    Args:
        corpus: where the prompts come from.
        split: ``train``, ``val`` or ``test``.
    """

    def __init__(self, corpus: Corpus, split: str) -> None:
        self.corpus = corpus
        self.split = check_split(split)

    def __len__(self) -> int:
        return self.corpus.size(self.split)

    def __getitem__(self, index: int) -> tuple[int, str]:
        index = int(index)
        return index, self.corpus.prompt(self.split, index)


def collate_prompts(items: Sequence[tuple[int, str]]) -> PromptBatch:
    """Stack ``(index, text)`` items into a ``PromptBatch`` without embeddings."""
    if len(items) == 0:
        raise ValueError("collate_prompts got an empty batch")
    ids, texts = zip(*items, strict=True)
    return PromptBatch(ids=torch.tensor(ids, dtype=torch.long), texts=tuple(texts))
