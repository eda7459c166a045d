"""Prompt libraries in ScaleDreamer's JSON format: ``{"train": [...], "val": [...], "test": [...]}``.

The files of the paper's corpora (MG15, DF415, AT2520, DL17k, CP100k) are described in
``shared/corpora/SOURCES.md``. Prompts are kept verbatim (duplicates included, as in DL17k's
train split) and packed into one UTF-8 byte buffer with offsets per split: ~110k CP100k captions
are a few megabytes with no per-prompt Python object, so data-loader workers forked from the
process do not copy them page by page as reference counts change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from asd3d.corpus.base import SPLITS, Corpus, check_split


class _PackedStrings:
    """An immutable list of strings stored as UTF-8 bytes plus offsets."""

    def __init__(self, items: list[str]) -> None:
        encoded = [item.encode("utf-8") for item in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8")


def _load(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt library {str(path)!r} not found; put ScaleDreamer's <name>.json there or "
            f"point corpus.path (or ASD3D_CORPORA_DIR / paths.corpora_dir) at it"
        )
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        message = str(error).replace("\n", " ")
        raise ValueError(f"prompt library {str(path)!r} is not valid JSON: {message}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"prompt library {str(path)!r} must hold a JSON object with keys "
            f"{list(SPLITS)}, found a {type(data).__name__}"
        )
    missing = [split for split in SPLITS if split not in data]
    if missing:
        raise ValueError(
            f"prompt library {str(path)!r} lacks the split(s) {missing}; expected "
            f"keys {list(SPLITS)}"
        )
    for split in SPLITS:
        items = data[split]
        if not isinstance(items, list):
            raise ValueError(
                f"prompt library {str(path)!r}: {split!r} must be a list of "
                f"strings, found a {type(items).__name__}"
            )
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ValueError(
                    f"prompt library {str(path)!r}: {split}[{i}] is "
                    f"{type(item).__name__} {item!r}, not a string"
                )
            if not item.strip():
                raise ValueError(
                    f"prompt library {str(path)!r}: {split}[{i}]={item!r}: allowed a non-empty prompt"
                )
    if not data["train"]:
        raise ValueError(f"prompt library {str(path)!r} has an empty 'train' split")
    return {split: data[split] for split in SPLITS}


class PromptLibraryCorpus(Corpus):
    """The prompts of one ScaleDreamer prompt-library JSON file.

    Args:
        path: the ``.json`` file.
        name: corpus name for logs (default: the file name without ``_prompt_library.json``).
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        splits = _load(self.path)
        self._splits = {split: _PackedStrings(items) for split, items in splits.items()}
        self.name = (
            name
            if name is not None
            else self.path.name.removesuffix(".json").removesuffix("_prompt_library")
        )

    def size(self, split: str) -> int:
        return len(self._splits[check_split(split)])

    def _prompt(self, split: str, index: int) -> str:
        return self._splits[split][index]
