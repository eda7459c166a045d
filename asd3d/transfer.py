"""Host-to-device copies that do not stall the host.

A plain ``tensor.to("cuda")`` from pageable memory waits for the device to finish its queued
work before it copies; the hot path of a training step instead stages host data in pinned memory
and copies it asynchronously (the caching host allocator keeps the staging buffer alive until
the copy is done). On the CPU, or between devices, this is a plain ``.to``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x`` on ``device``: one pinned, non-blocking copy for CPU -> CUDA, else ``x.to(device)``."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
