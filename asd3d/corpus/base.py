"""The interface of a prompt corpus: named splits of prompts, addressed by index.

A corpus knows no model. It hands out prompt texts by ``(split, index)`` so that corpora of any
size stream: nothing forces all prompts (let alone their embeddings) into memory at once.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_split(split: str) -> str:
    """``split`` itself; ValueError naming it unless it is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; a corpus has splits {', '.join(SPLITS)}")
    return split


class Corpus(abc.ABC):
    """Prompts in the splits ``train``, ``val`` and ``test``.

    Subclasses implement ``size`` and ``_prompt``; ``prompt`` checks the split and index first.
    """

    name: str

    @abc.abstractmethod
    def size(self, split: str) -> int:
        """Number of prompts in ``split``."""

    @abc.abstractmethod
    def _prompt(self, split: str, index: int) -> str:
        """Prompt ``index`` of ``split`` (both already checked)."""

    def prompt(self, split: str, index: int) -> str:
        """Prompt ``index`` of ``split``; ValueError for an unknown split, IndexError when out of
        range."""
        return self._prompt(split, self._check_index(split, index))

    def prompts(self, split: str, indices: Iterable[int]) -> list[str]:
        """Prompts at ``indices`` of ``split``, in order."""
        return [self.prompt(split, index) for index in indices]

    def _check_index(self, split: str, index: int) -> int:
        size = self.size(check_split(split))
        try:
            value = int(index)  # accepts numpy / 0-d tensor integers
        except (TypeError, ValueError):
            raise TypeError(f"prompt index must be an integer, got {index!r}") from None
        if value != index or not 0 <= value < size:
            raise IndexError(
                f"prompt index {index!r} outside [0, {size}) of split {split!r} of "
                f"corpus {self.name!r}"
            )
        return value

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={self.size(split)}" for split in SPLITS)
        return f"{type(self).__name__}(name={self.name!r}, {sizes})"
