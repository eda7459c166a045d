"""View-dependent prompting for text-only priors (REFERENCE.md §1, "SD uses view-dependent prompt
suffixes"; DreamFusion §3, threestudio's thresholds as ScaleDreamer's release sets them).

A text-only prior cannot see the camera, so each view's prompt names the side it shows:
``", front view"`` for ``|azimuth| < 30°``, ``", back view"`` for ``|azimuth| > 150°``,
``", side view"`` otherwise, and ``", overhead view"`` (taking precedence) for
``elevation > 60°``. Azimuth 0 is the camera on ``+x`` looking at the origin (``Cameras``);
both angles are in radians and the azimuth is wrapped to ``(-180°, 180°]`` first. The boundaries
are strict, as threestudio's comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

FRONT_DEG = 30.0  # |azimuth| below this: front
BACK_DEG = 150.0  # |azimuth| above this: back
OVERHEAD_DEG = 60.0  # elevation above this: overhead, whatever the azimuth

SUFFIXES: dict[str, str] = {
    "front": ", front view",
    "side": ", side view",
    "back": ", back view",
    "overhead": ", overhead view",
}


def view_directions(azimuth: Float[Tensor, "B"], elevation: Float[Tensor, "B"]) -> list[str]:
    """The named direction (``front`` / ``side`` / ``back`` / ``overhead``) of every view."""
    # Rounded to 1e-4 degrees: a float32 camera placed "at 60°" sits on the boundary, not past it.
    azimuth_deg = torch.rad2deg(azimuth.detach().double().cpu()).round(decimals=4)
    # Wrap to (-180, 180] so cameras given as e.g. 350° count as front.
    azimuth_deg = 180.0 - torch.remainder(180.0 - azimuth_deg, 360.0)
    elevation_deg = torch.rad2deg(elevation.detach().double().cpu()).round(decimals=4)
    names: list[str] = []
    for az, el in zip(azimuth_deg.abs().tolist(), elevation_deg.tolist()):
        if el > OVERHEAD_DEG:
            names.append("overhead")
        elif az < FRONT_DEG:
            names.append("front")
        elif az > BACK_DEG:
            names.append("back")
        else:
            names.append("side")
    return names


def view_dependent_texts(
    prompts: Sequence[str], azimuth: Float[Tensor, "B"], elevation: Float[Tensor, "B"]
) -> list[str]:
    """``B = P * V`` texts: each prompt repeated for its ``V`` consecutive views, with the suffix
    of each view's direction appended."""
    views, remainder = divmod(len(azimuth), max(len(prompts), 1))
    if remainder or views == 0:
        raise ValueError(f"{len(azimuth)} views cannot be split evenly over {len(prompts)} prompts")
    directions = view_directions(azimuth, elevation)
    return [prompts[row // views] + SUFFIXES[direction] for row, direction in enumerate(directions)]
