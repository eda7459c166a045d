"""Scalars that change over training, with breakpoints given as fractions of ``max_steps``.

The release anneals T_min/T_max and ramps loss weights by step counts; stating breakpoints as
fractions of the run keeps a recipe correct when ``trainer.max_steps`` changes (quickstart,
paper-length runs, resumed runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor at optimizer step ``step``: linear warm-up over ``warmup`` steps, then
    a half cosine from 1 to ``min_ratio`` at ``total`` (``min_ratio`` afterwards)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is not a fraction of the run; use a value in [0, 1]")


@dataclass(frozen=True)
class ConstantSchedule:
    """The same value for the whole run."""

    value: float

    def __call__(self, fraction: float) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LinearSchedule:
    """``start`` until ``begin``, linear to ``end`` at ``end_at``, ``end`` afterwards.

    ``begin`` and ``end_at`` are fractions of ``trainer.max_steps`` in ``[0, 1]``.
    """

    start: float
    end: float
    begin: float = 0.0
    end_at: float = 1.0

    def __post_init__(self) -> None:
        _check_fraction("begin", self.begin)
        _check_fraction("end_at", self.end_at)
        if self.end_at < self.begin:
            raise ValueError(f"end_at={self.end_at} is before begin={self.begin}; swap them")

    def __call__(self, fraction: float) -> float:
        if fraction <= self.begin:
            return float(self.start)
        if fraction >= self.end_at:
            return float(self.end)
        progress = (fraction - self.begin) / (self.end_at - self.begin)
        return float(self.start + (self.end - self.start) * progress)
