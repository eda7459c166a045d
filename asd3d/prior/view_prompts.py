"""View-dependent prompting for text-only priors (REFERENCE.md §1, "SD uses view-dependent prompt
suffixes"; DreamFusion §3, threestudio's thresholds as ScaleDreamer's release sets them).

A text-only prior cannot see the camera, so each view's prompt names the side it shows:
``", front view"`` for ``|azimuth| < 30°``, ``", back view"`` for ``|azimuth| > 150°``,
``", side view"`` otherwise, and ``", overhead view"`` (taking precedence) for
``elevation > 60°``. Azimuth 0 is the camera on ``+x`` looking at the origin (``Cameras``);
both angles are in radians and the azimuth is wrapped to ``(-180°, 180°]`` first. The boundaries
are strict, as threestudio's comparisons.

Perp-Neg (Armandpour et al. 2023, as threestudio's ``prompt_processors/base.py`` and ScaleDreamer's
SD guidance implement it) replaces the discrete suffix by an interpolation and adds two view
negatives per view (:func:`perp_neg_views`):

* ``|az| < 90°``: ``r = 1 - |az|/90`` (1 at the front, 0 at the side); positive tokens
  ``r front + (1 - r) side``; negatives ``front`` with ``f_fs(r)`` and ``side`` with
  ``f_sf(1 - r)``;
* otherwise: ``r = 2 - |az|/90`` (1 at the side, 0 at the back); positive ``r side + (1 - r) back``;
  negatives ``side`` with ``f_sb(r)`` and ``front`` with ``f_fsb(r)``;
* overhead views (elevation > 60°): the overhead prompt, both negatives off (weight 0).

``f(r) = a exp(-b r) + c`` with the release's ``(a, b, c)``; the effective weight of a negative is
``guidance * f(r)`` with ``guidance = -0.5`` in ScaleDreamer's SD configs (``guidance_perp_neg``;
negative = pushed away). The interpolation is of the text encoder's token states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def _degrees(
    azimuth: Float[Tensor, "B"], elevation: Float[Tensor, "B"]
) -> tuple[Float[Tensor, "B"], Float[Tensor, "B"]]:
    """``|azimuth|`` wrapped to ``[0°, 180°]`` and elevation, in float64 degrees on the CPU."""
    # Rounded to 1e-4 degrees: a float32 camera placed "at 60°" sits on the boundary, not past it.
    azimuth_deg = torch.rad2deg(azimuth.detach().double().cpu()).round(decimals=4)
    # Wrap to (-180, 180] so cameras given as e.g. 350° count as front.
    azimuth_deg = 180.0 - torch.remainder(180.0 - azimuth_deg, 360.0)
    elevation_deg = torch.rad2deg(elevation.detach().double().cpu()).round(decimals=4)
    return azimuth_deg.abs(), elevation_deg


def view_directions(azimuth: Float[Tensor, "B"], elevation: Float[Tensor, "B"]) -> list[str]:
    """The named direction (``front`` / ``side`` / ``back`` / ``overhead``) of every view."""
    azimuth_deg, elevation_deg = _degrees(azimuth, elevation)
    names: list[str] = []
    for az, el in zip(azimuth_deg.tolist(), elevation_deg.tolist()):
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


class PerpNegWeights:
    """Perp-Neg's weight functions ``f(r) = a exp(-b r) + c`` and their overall scale.

    Args:
        guidance: effective weight of a view negative = ``guidance * f(r)`` (ScaleDreamer's SD
            configs: ``guidance_perp_neg = -0.5``; negative pushes away from the negative).
        f_sb, f_fsb, f_fs, f_sf: ``(a, b, c)`` of side-vs-back, front-vs-side-back,
            front-vs-side and side-vs-front (threestudio's ``perp_neg_f_*`` defaults, which the
            release keeps: ``(1, 0.5, -0.606)``, ``(1, 0.5, 0.967)``, ``(4, 0.5, -2.426)`` twice).
    """

    def __init__(
        self,
        guidance: float = -0.5,
        f_sb: Sequence[float] = (1.0, 0.5, -0.606),
        f_fsb: Sequence[float] = (1.0, 0.5, 0.967),
        f_fs: Sequence[float] = (4.0, 0.5, -2.426),
        f_sf: Sequence[float] = (4.0, 0.5, -2.426),
    ) -> None:
        self.guidance = float(guidance)
        curves = {"f_sb": f_sb, "f_fsb": f_fsb, "f_fs": f_fs, "f_sf": f_sf}
        for name, curve in curves.items():
            if len(curve) != 3:
                raise ValueError(f"prior.perp_neg_weights.{name}={list(curve)} must be [a, b, c]")
        self.f_sb, self.f_fsb, self.f_fs, self.f_sf = (
            tuple(float(v) for v in curve) for curve in curves.values()
        )

    @staticmethod
    def decay(curve: tuple[float, ...], r: float) -> float:
        """``a exp(-b r) + c``."""
        a, b, c = curve
        return a * math.exp(-b * r) + c


@dataclass(frozen=True)
class PerpNegViews:
    """Per view (``B`` rows): the positive as the mix ``r * mix[0] + (1 - r) * mix[1]`` of two
    direction prompts, the two negative directions (``None``: the negative prompt, weight 0)
    and their effective weights."""

    mix: list[tuple[str, str]]
    ratio: Float[Tensor, "B"]
    negatives: list[tuple[str | None, str | None]]
    weights: Float[Tensor, "B 2"]


def perp_neg_views(
    azimuth: Float[Tensor, "B"], elevation: Float[Tensor, "B"], weights: PerpNegWeights
) -> PerpNegViews:
    """Perp-Neg's interpolated positive, view negatives and weights of every view (module doc)."""
    azimuth_deg, _ = _degrees(azimuth, elevation)
    mix: list[tuple[str, str]] = []
    negatives: list[tuple[str | None, str | None]] = []
    ratios: list[float] = []
    rows: list[tuple[float, float]] = []
    for az, direction in zip(azimuth_deg.tolist(), view_directions(azimuth, elevation)):
        if direction == "overhead":
            mix.append(("overhead", "overhead"))
            ratios.append(1.0)
            negatives.append((None, None))
            rows.append((0.0, 0.0))
        elif az < 90.0:
            r = 1.0 - az / 90.0
            mix.append(("front", "side"))
            ratios.append(r)
            negatives.append(("front", "side"))
            rows.append((weights.decay(weights.f_fs, r), weights.decay(weights.f_sf, 1.0 - r)))
        else:
            r = 2.0 - az / 90.0
            mix.append(("side", "back"))
            ratios.append(r)
            negatives.append(("side", "front"))
            rows.append((weights.decay(weights.f_sb, r), weights.decay(weights.f_fsb, r)))
    return PerpNegViews(
        mix=mix,
        ratio=torch.tensor(ratios, dtype=torch.float32),
        negatives=negatives,
        weights=weights.guidance * torch.tensor(rows, dtype=torch.float32).view(-1, 2),
    )
