"""Small PIL chart primitives shared by the sweep summary's bar chart and training curves
(matplotlib is not a dependency): a colour palette, a white canvas with the project's font,
"nice" axis ticks and an atomic PNG save."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from asd3d.io import atomic_path

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "canvas", "chart_font", "nice_ticks", "save_png", "tick_label"]

#: Distinct RGB colours, used in order (one per metric in the bar chart, one per run in curves).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def chart_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font the project's media use (Pillow's default at 11 px)."""
    from asd3d.evaluation.media import _font

    return _font()


def canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white RGB image and a drawing context on it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    return image, ImageDraw.Draw(image)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 x 10^k apart) covering ``[low, high]``:
    the first tick is at or below ``low`` and the last at or above ``high``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"axis range [{low}, {high}] is not finite")
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(1, count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    """``value`` with as many decimals as the tick spacing needs (0.25 -> "0.25", 500 -> "500")."""
    spacing = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = next(d for d in range(12) if abs(round(spacing, d) - spacing) < 1e-9 * spacing)
    return f"{value:.{decimals}f}"


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` atomically (a reader never sees half a PNG)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
