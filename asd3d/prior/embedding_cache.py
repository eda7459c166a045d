"""Precomputed text embeddings on disk: one fp16 file per tensor, read row by row.

The release held every prompt's embeddings in RAM (~1.6 MB of fp32 per prompt, REFERENCE.md §10).
Here ``python -m asd3d.embed_prompts`` writes them once to a directory:

* ``tokens.npy``  ``N x L x D`` float16 (the 77 token states of every text),
* ``pooled.npy``  ``N x D`` float16 (the EOS state),
* ``keys.npy``    ``N`` uint64, sorted: a 64-bit BLAKE2b hash of each text (row ``i`` holds the
  text whose key is ``keys[i]``),
* ``prompts.jsonl`` the texts in row order (for people and for rebuilding),
* ``index.json``  format, version, model id, ``N``, ``L``, ``D``.

The ``.npy`` files are plain C-order arrays (``np.load(path, mmap_mode="r")`` maps them). The
reader maps only ``keys.npy`` (8 bytes per text) and finds a text by binary search; it reads the
rows it needs with positional reads instead of mapping the big files, so file pages never count
in the process' resident memory: RSS stays flat whatever ``N`` is and however many rows a long
run has touched.

A directory is built under ``<out>.partial`` and renamed into place when complete, so a killed
build never leaves a usable-looking half file. Several processes (one per GPU) may fill disjoint
rows of the same preallocated files (:func:`build_embedding_file`); writes are positional too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.io import atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "asd3d-text-embeddings"
VERSION = 1
INDEX, TOKENS, POOLED, KEYS, PROMPTS = (
    "index.json",
    "tokens.npy",
    "pooled.npy",
    "keys.npy",
    "prompts.jsonl",
)
REBUILD = "rebuild it with `python -m asd3d.embed_prompts prior=<prior> corpus=<corpus>`"

EncodeFn = Callable[[list[str]], tuple[Tensor, Tensor]]


def text_key(text: str) -> int:
    """The 64-bit key of a text (BLAKE2b of its UTF-8 bytes, little-endian)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def plan_rows(texts: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """Unique texts in row order (sorted by key) and their sorted keys; ValueError on a key
    collision (two texts with one 64-bit hash: about 1e-9 for a million texts)."""
    by_key: dict[int, str] = {}
    for text in texts:
        key = text_key(text)
        other = by_key.setdefault(key, text)
        if other != text:
            raise ValueError(f"texts {other!r} and {text!r} share the 64-bit key {key:#x}")
    keys = np.array(sorted(by_key), dtype=np.uint64)
    return [by_key[int(key)] for key in keys], keys


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def build_embedding_file(
    out: str | Path,
    texts: Iterable[str],
    encode: EncodeFn,
    model: str,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Encode ``texts`` with ``encode`` (texts -> ``tokens P x L x D``, ``pooled P x D``) into the
    directory ``out``; return it.

    With ``world_size > 1`` every process calls this with the same arguments (and a ``barrier``
    that synchronises them, e.g. ``torch.distributed.barrier``): rank 0 preallocates the files,
    each rank encodes and writes the batches ``rank, rank + world_size, ...`` into its rows of
    the shared files, and rank 0 writes the index and moves the directory into place.
    """
    out = Path(out)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    ordered, keys = plan_rows(texts)
    if not ordered:
        raise ValueError(f"no texts to embed into {out}")
    partial = _partial_dir(out)
    probe_tokens, probe_pooled = encode(ordered[:1])
    _, num_tokens, dim = probe_tokens.shape
    if probe_pooled.shape != (1, dim):
        raise ValueError(
            f"encoder returned pooled {tuple(probe_pooled.shape)}, expected (1, {dim})"
        )
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        open_memmap = np.lib.format.open_memmap
        open_memmap(partial / TOKENS, "w+", np.float16, (len(ordered), num_tokens, dim)).flush()
        open_memmap(partial / POOLED, "w+", np.float16, (len(ordered), dim)).flush()
        np.save(partial / KEYS, keys)
        with open(partial / PROMPTS, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(text) + "\n" for text in ordered)
    barrier()

    tokens_file = _RowFile(partial / TOKENS, (len(ordered), num_tokens, dim), "r+b")
    pooled_file = _RowFile(partial / POOLED, (len(ordered), dim), "r+b")
    starts = range(rank * batch_size, len(ordered), batch_size * world_size)
    bar = _progress(len(starts), f"embedding {len(ordered)} texts", progress and rank == 0)
    for start in starts:
        tokens, pooled = encode(ordered[start : start + batch_size])
        tokens_file.write(start, tokens)
        pooled_file.write(start, pooled)
        bar.update(1)
    bar.close()
    tokens_file.close()
    pooled_file.close()
    barrier()

    if rank == 0:
        index = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "num_texts": len(ordered),
            "num_tokens": int(num_tokens),
            "dim": int(dim),
            "dtype": "float16",
        }
        atomic_write_text(partial / INDEX, json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    barrier()
    return out


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled)


class _RowFile:
    """Rows of one float16 ``.npy`` array, read and written with positional I/O (never mapped,
    so its pages do not count in the process' resident memory)."""

    def __init__(
        self, path: Path, shape: tuple[int, ...], mode: str = "rb", what: str = ""
    ) -> None:
        what = what or str(path)
        try:
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                found_shape, fortran, dtype = read_header(file)
                self.offset = file.tell()
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{what}: {path} is not a readable .npy array ({err}); {REBUILD}"
            ) from None
        if tuple(found_shape) != shape or fortran or np.dtype(dtype) != np.float16:
            raise ValueError(
                f"{what}: {path} holds {np.dtype(dtype)} {tuple(found_shape)}, the index says "
                f"float16 {shape}; {REBUILD}"
            )
        self.row_shape = shape[1:]
        self.row_bytes = int(np.prod(self.row_shape)) * 2
        expected = self.offset + shape[0] * self.row_bytes
        if path.stat().st_size != expected:
            raise ValueError(
                f"{what}: {path} has {path.stat().st_size} bytes, expected {expected} "
                f"(truncated?); {REBUILD}"
            )
        self.path, self.mode = path, mode
        self.file = open(path, mode, buffering=0)  # noqa: SIM115 - held for the object's life

    def __getstate__(self) -> dict:
        # Picklable (ddp_spawn sends the prior to its processes): the file is reopened there.
        return {k: v for k, v in self.__dict__.items() if k != "file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.file = open(self.path, self.mode, buffering=0)  # noqa: SIM115

    def read(self, row: int) -> Tensor:
        out = torch.empty(self.row_shape, dtype=torch.float16)
        self.file.seek(self.offset + row * self.row_bytes)
        self.file.readinto(memoryview(out.numpy()).cast("B"))  # type: ignore[attr-defined,arg-type]
        return out

    def write(self, row: int, rows: Tensor) -> None:
        data = rows.detach().to("cpu", torch.float16).contiguous().numpy()
        if data.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {data.shape[1:]} for a file of {self.row_shape}")
        self.file.seek(self.offset + row * self.row_bytes)
        self.file.write(data.tobytes())

    def close(self) -> None:
        self.file.close()


class TextEmbeddingFile:
    """Reads embeddings written by :func:`build_embedding_file` (see the module docstring).

    Args:
        path: the directory.
        model: the prior's weights (``prior.pretrained``); must equal the file's model id.
        text_dim: the prior's text width; must equal the file's ``D``.

    Every problem with the directory is a one-line ``FileNotFoundError`` / ``ValueError`` that
    names the path and how to rebuild it.
    """

    def __init__(self, path: str | Path, model: str, text_dim: int) -> None:
        self.path = Path(path).expanduser()
        what = f"prior.text_embeddings={str(path)!r}"
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{what}: no {INDEX} in {self.path}; {REBUILD}")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise ValueError(f"format {index.get('format')!r} v{index.get('version')}")
            self.num_texts, num_tokens, dim = (
                int(index["num_texts"]),
                int(index["num_tokens"]),
                int(index["dim"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{what}: {index_path} is not an asd3d text-embedding index ({err}); {REBUILD}"
            ) from None
        if index["model"] != model:
            raise ValueError(
                f"{what} was built for model {index['model']!r}, the prior loads {model!r}; "
                f"{REBUILD} or set prior.pretrained={index['model']}"
            )
        if dim != text_dim:
            raise ValueError(
                f"{what} has width {dim}, the prior's text_dim is {text_dim}; {REBUILD}"
            )
        self.model = model
        self.tokens = _RowFile(self.path / TOKENS, (self.num_texts, num_tokens, dim), what=what)
        self.pooled = _RowFile(self.path / POOLED, (self.num_texts, dim), what=what)
        try:
            self.keys = np.load(self.path / KEYS, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"{what}: cannot read {self.path / KEYS} ({err}); {REBUILD}") from None
        if self.keys.shape != (self.num_texts,) or self.keys.dtype != np.uint64:
            raise ValueError(
                f"{what}: {self.path / KEYS} holds {self.keys.dtype} {self.keys.shape}, expected "
                f"uint64 ({self.num_texts},); {REBUILD}"
            )
        self.num_missing = 0
        self._warned = False

    def __len__(self) -> int:
        return self.num_texts

    def rows(self, texts: Sequence[str]) -> list[int | None]:
        """The row of each text, ``None`` where the file does not hold it."""
        keys = np.array([text_key(text) for text in texts], dtype=np.uint64)
        positions = np.searchsorted(self.keys, keys)
        return [
            int(position) if position < self.num_texts and self.keys[position] == key else None
            for position, key in zip(positions.tolist(), keys)
        ]

    def lookup(
        self, texts: Sequence[str]
    ) -> dict[str, tuple[Float[Tensor, "L D"], Float[Tensor, "D"]]]:
        """``text -> (tokens, pooled)`` (fp16, CPU) for the texts the file holds."""
        return {
            text: (self.tokens.read(row), self.pooled.read(row))
            for text, row in zip(texts, self.rows(texts))
            if row is not None
        }

    def note_missing(self, texts: Sequence[str]) -> None:
        """Count texts that had to be encoded on demand; warn once (the file may be stale)."""
        if not texts:
            return
        self.num_missing += len(texts)
        if not self._warned:
            self._warned = True
            log.warning(
                "%d text(s) not in %s (e.g. %r): encoding them on demand; %s to include them",
                len(texts),
                self.path,
                texts[0],
                REBUILD,
            )
