"""Atomic file writing and safe checkpoint loading.

Every file asd3d writes (checkpoints, metrics, images, videos, meshes) goes through
:func:`atomic_path`: the content is written to a temporary name in the destination's own directory
and moved into place with :func:`os.replace`, which is atomic on POSIX and Windows when source and
destination share a file system. A run killed mid-write, or a writer that raises, therefore never
leaves a truncated file under the real name -- the previous version (if any) stays intact.

:func:`load_checkpoint` is the one way asd3d reads a checkpoint. It uses
``torch.load(weights_only=True)``, which refuses any pickled object outside torch's allowlist of
tensors and plain containers, so loading a checkpoint from an untrusted source cannot execute code.
Writers must therefore store plain containers only (e.g. the resolved config as
``OmegaConf.to_container(cfg, resolve=True)``, never a ``DictConfig``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_KEY",
    "RECIPE_KEY",
    "CheckpointError",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "remove_stale_temporaries",
]

#: Key under which train.py stores the resolved config (a plain dict) in every checkpoint. It is a
#: record for people and dashboards; nothing is ever built from it (see :data:`RECIPE_KEY`).
CONFIG_KEY = "asd3d_config"
#: Key of the run's recipe: the Hydra group choices and command-line overrides it was composed
#: from, its run directory's W&B id. Resuming and evaluating rebuild the run by composing the
#: project's own ``conf/`` with it (:mod:`asd3d.checkpoint`).
RECIPE_KEY = "asd3d_run"


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message is one line naming the path and the problem."""


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[^.]+)?$")


def _temp_name(path: Path) -> Path:
    # Keep the destination's suffix last so writers that pick a format from the file name
    # (imageio, ffmpeg, trimesh) still do; the leading dot hides the file from casual listings.
    # The name is random rather than created by mkstemp so the writer creates the file itself
    # with the usual umask permissions (mkstemp would leave it 0600 after the rename).
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    # Flush the data to disk before the rename, so a power loss cannot leave the new name
    # pointing at an empty file (the rename may be journalled before the data otherwise).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary path does not exist yet and has the same suffix as ``path``; the caller's writer
    creates it. Parent directories of ``path`` are created. If the block raises (including
    ``KeyboardInterrupt``) the temporary file is removed and ``path`` is left untouched. If the
    block finishes without creating the temporary file, ``FileNotFoundError`` is raised.

    Example::

        with atomic_path(out_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp} (destination {path})")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (``.last.<hex>.tmp.ckpt``).

    Only names of the exact form :func:`atomic_path` creates are touched. Call it when no writer
    of this run is active (at the start of training). Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and _TEMP_NAME.match(p.name)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a :class:`Path`."""
    # "xb": the random temp name must not exist yet; never clobber someone else's temp file.
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically; returns ``path``.

    Store plain containers of tensors, numbers and strings only, so that :func:`load_checkpoint`
    (``weights_only=True``) can read the file back.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _weights_only_detail(message: str) -> str:
    # torch wraps the useful sentence ("Trying to load unsupported GLOBAL posix.system ...") in
    # several lines of boilerplate about the weights_only default; keep only the useful part.
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(boilerplate)]
    return _one_line(" ".join(kept) or message)


def _is_zip(path: Path) -> bool:
    # torch.save writes a zip archive since torch 1.6; anything else is legacy pickle or junk.
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an asd3d checkpoint on the CPU without executing any code from the file.

    Returns the checkpoint dict (tensors on the CPU). Raises :class:`CheckpointError` with a
    one-line message when the path is missing or a directory, when the file is not a PyTorch
    checkpoint, when it holds objects that safe loading refuses (arbitrary pickled classes or
    callables -- these are rejected, never called), or when it lacks the ``asd3d_config`` entry
    that asd3d's ``train.py`` writes.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CheckpointError(f"{where} not found")
    if path.is_dir():
        raise CheckpointError(f"{where} is a directory, expected a file written by train.py")
    try:
        with warnings.catch_warnings():
            # Old pickle protocols trigger a harmless "protocol N" warning from the safe unpickler.
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if str(err).startswith("Weights only load failed"):
            raise CheckpointError(
                f"{where} holds objects that safe loading (weights_only=True) refuses to "
                f"unpickle: {_weights_only_detail(str(err))}"
            ) from None
        raise CheckpointError(
            f"{where} is not a PyTorch checkpoint ({_one_line(str(err))})"
        ) from None
    except PermissionError as err:
        raise CheckpointError(
            f"{where} cannot be read ({_one_line(err.strerror or str(err))})"
        ) from None
    except Exception as err:  # noqa: BLE001 -- torch raises KeyError/RuntimeError/EOFError/... on junk
        detail = _one_line(f"{type(err).__name__}: {err}")
        if not _is_zip(path):
            # torch's legacy reader fails on foreign files with cryptic errors (KeyError: 101).
            detail = f"not a torch.save archive; {detail}"
        raise CheckpointError(f"{where} is not a PyTorch checkpoint ({detail})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{where} is not an asd3d checkpoint (it holds a {type(checkpoint).__name__}, "
            "expected a dict)"
        )
    if CONFIG_KEY not in checkpoint:
        raise CheckpointError(f"{where} has no asd3d config: was it written by asd3d's train.py?")
    return checkpoint
