"""Renaming the keys of ScaleDreamer's released checkpoints to asd3d module keys.

The release saves Lightning checkpoints whose ``state_dict`` holds every module of a threestudio
system under its role (``geometry.``, ``background.``, ``renderer.``, ...). A mapping of key
prefixes is enough to load the parts asd3d shares with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def rename_prefixes(
    state: Mapping[str, Tensor], renames: Mapping[str, str], fp32_keys: frozenset[str] = frozenset()
) -> dict[str, Tensor]:
    """Keep the keys that start with a prefix in ``renames``, with that prefix replaced.

    The first matching prefix wins; keys matching none are dropped. Values whose new key is in
    ``fp32_keys`` are cast to float32 (tiny-cuda-nn tables may be stored in half precision).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                name = new + key[len(old) :]
                out[name] = value.float() if name in fp32_keys else value
                break
    return out
