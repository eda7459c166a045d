"""Checkpoint I/O: written atomically, loaded without executing code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from asd3d.io import atomic_torch_save, load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file and never unpickles code.

    Saving goes to a temporary file in the same directory, renamed over the target when complete;
    loading uses ``torch.load(weights_only=True)``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(Path(path))
