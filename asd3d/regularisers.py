"""Geometry regularisers of the release, with weights scheduled over training (REFERENCE.md §4).

* sparsity: ``mean sqrt(opacity^2 + 0.01)`` -- a smooth L1 pushing empty pixels to zero opacity;
* opaqueness: binary entropy of the (clamped) opacity -- pushes every pixel to 0 or 1;
* eikonal: ``mean (|grad sdf| - 1)^2`` (Gropp et al. 2020) -- keeps the field a distance.

Release weights: sparsity 20 constant; opaqueness 0 -> 10 over the last fifth of training;
eikonal 100 -> 1 over the first tenth (stated in the training YAMLs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from asd3d.types import RenderOutput

Weight = Callable[[float], float] | float


def sparsity_loss(opacity: Float[Tensor, "B 1 H W"]) -> Float[Tensor, ""]:
    """``mean sqrt(opacity^2 + 0.01)``: smooth L1 of the opacity."""
    return torch.sqrt(opacity.square() + 0.01).mean()


def opaqueness_loss(opacity: Float[Tensor, "B 1 H W"], eps: float = 1e-3) -> Float[Tensor, ""]:
    """Mean binary entropy ``-(o log o + (1 - o) log(1 - o))`` of ``o = clamp(opacity, eps, 1-eps)``.

    The clamp keeps the logarithms finite on exactly empty or opaque pixels; there the loss has
    no gradient, which is what it should be.
    """
    o = opacity.clamp(eps, 1.0 - eps)
    return -(o * torch.log(o) + (1.0 - o) * torch.log1p(-o)).mean()


def eikonal_loss(sdf_gradients: Float[Tensor, "P M 3"]) -> Float[Tensor, ""]:
    """``mean (|grad sdf| - 1)^2``: zero for an exact signed distance function."""
    return (sdf_gradients.norm(dim=-1) - 1.0).square().mean()


def _as_schedule(name: str, weight: Weight) -> Callable[[float], float]:
    if callable(weight):
        return weight
    if isinstance(weight, int | float):
        value = float(weight)
        return lambda fraction: value
    raise TypeError(
        f"{name} weight must be a number or a callable of the training fraction, "
        f"got {type(weight).__name__}"
    )


class Regularisers:
    """Weighted sparsity / opaqueness / eikonal terms of a render.

    Each weight is a number or any callable ``fraction -> weight`` (e.g.
    :class:`asd3d.schedules.LinearSchedule`), ``fraction = step / max_steps``. A term whose
    weight is 0 at this fraction is not computed.

    Returns, from ``__call__``, the weighted terms under ``sparsity`` / ``opaqueness`` /
    ``eikonal`` (only those with a non-zero weight) and their sum under ``total``.
    """

    def __init__(
        self, sparsity: Weight = 0.0, opaqueness: Weight = 0.0, eikonal: Weight = 0.0
    ) -> None:
        self.weights = {
            "sparsity": _as_schedule("sparsity", sparsity),
            "opaqueness": _as_schedule("opaqueness", opaqueness),
            "eikonal": _as_schedule("eikonal", eikonal),
        }

    def __repr__(self) -> str:
        return f"Regularisers({', '.join(f'{k}={v!r}' for k, v in self.weights.items())})"

    def __call__(self, render: RenderOutput, fraction: float) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for name, schedule in self.weights.items():
            weight = float(schedule(fraction))
            if weight == 0.0:
                continue
            if name == "sparsity":
                value = sparsity_loss(render.opacity)
            elif name == "opaqueness":
                value = opaqueness_loss(render.opacity)
            else:
                if render.sdf_gradients is None:
                    raise ValueError(
                        f"eikonal weight is {weight} but the render has no "
                        "sdf_gradients; set renderer.eikonal_points > 0"
                    )
                value = eikonal_loss(render.sdf_gradients)
            terms[name] = weight * value
        total = sum(
            terms.values(),
            torch.zeros((), device=render.opacity.device, dtype=render.opacity.dtype),
        )
        return {**terms, "total": total}
