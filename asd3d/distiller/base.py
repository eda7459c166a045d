"""The interface every distiller implements, and the one batched prior call they share."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from asd3d.distiller import math
from asd3d.distiller.timesteps import sample_timesteps
from asd3d.prior.schedule import gather_abar
from asd3d.types import Condition, ConditionPair, DistillOutput

if TYPE_CHECKING:
    from asd3d.prior.base import Prior

PredictFn = Callable[[Tensor, Tensor, Condition], Tensor]
Schedule = Callable[[float], float]


@dataclass(frozen=True)
class Query:
    """One block of rows of the batched prior call: noisy input, timesteps, condition."""

    x_t: Float[Tensor, "B C h w"]
    t: Int[Tensor, "B"]
    condition: Condition


@torch.no_grad()
def predict_batched(predict: PredictFn, queries: Sequence[Query]) -> list[Float[Tensor, "B C h w"]]:
    """Answer all queries with ONE prior call (mixed timesteps and conditions), split back."""
    x = torch.cat([q.x_t for q in queries])
    t = torch.cat([q.t for q in queries])
    condition = Condition.concat([q.condition for q in queries])
    eps = predict(x, t, condition)
    return list(eps.split([len(q.t) for q in queries]))


def guidance_queries(
    x_t: Float[Tensor, "B C h w"], t: Int[Tensor, "B"], conditions: ConditionPair
) -> list[Query]:
    """The rows classifier-free guidance needs at one noisy input: conditional, unconditional,
    then Perp-Neg's view negatives when ``conditions.perp_neg`` is set (2 or 2 + K blocks)."""
    queries = [Query(x_t, t, conditions.positive), Query(x_t, t, conditions.negative)]
    if conditions.perp_neg is not None:
        queries += [Query(x_t, t, negative) for negative in conditions.perp_neg.negatives]
    return queries


def combine_guidance(
    predictions: Sequence[Float[Tensor, "B C h w"]], conditions: ConditionPair
) -> tuple[Tensor, Tensor]:
    """``(eps_cond, eps_uncond)`` from the answers to :func:`guidance_queries`; with Perp-Neg,
    ``eps_cond`` is :func:`asd3d.distiller.math.perp_neg_conditional` (CFG of it is Perp-Neg's)."""
    eps_cond, eps_uncond, *eps_negatives = predictions
    if conditions.perp_neg is not None:
        eps_cond = math.perp_neg_conditional(
            eps_cond, eps_uncond, eps_negatives, conditions.perp_neg.weights.to(eps_cond.device)
        )
    return eps_cond, eps_uncond


class Distiller(nn.Module, abc.ABC):
    """Turns renders encoded for the prior into a loss whose gradient is the method's update.

    A distiller sees images and predictions, never networks or rays: the prior enters only as
    the ``predict`` function. Subclasses implement :meth:`gradient`.

    Args:
        t_min, t_max: schedules of the sampled timestep range over the run (fractions of
            ``max_steps`` as breakpoints), integer timesteps of the prior's schedule.
        weighting: ``w(t)``, see :func:`asd3d.distiller.math.timestep_weight`.
        grad_clip: optional element-wise clamp of the update (``null`` for none).
    """

    def __init__(
        self,
        t_min: Schedule,
        t_max: Schedule,
        weighting: str = "sds",
        grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        if weighting not in math.WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}; use one of {', '.join(math.WEIGHTINGS)}"
            )
        self.t_min = t_min
        self.t_max = t_max
        self.weighting = weighting
        self.grad_clip = grad_clip

    def timestep_range(self, fraction: float) -> tuple[int, int]:
        """``(T_min, T_max)`` at this point of the run, as integers."""
        return int(round(self.t_min(fraction))), int(round(self.t_max(fraction)))

    def attach_prior(self, prior: Prior) -> None:
        """Called once by the system, before optimisers and checkpoints exist. A distiller that
        trains its own model on top of the prior (VSD's LoRA) builds it here; default: nothing."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups of the distiller's own trainable model (none by default)."""
        return []

    def forward(
        self,
        z: Float[Tensor, "B C h w"],
        conditions: ConditionPair,
        predict: PredictFn,
        alphas_cumprod: Float[Tensor, "T"],
        fraction: float,
        group_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """Sample ``t`` and ``eps``, query the prior once, return the surrogate loss."""
        t_min, t_max = self.timestep_range(fraction)
        t = sample_timesteps(
            z.shape[0] // group_size, group_size, t_min, t_max, generator, z.device
        )
        eps = torch.randn(
            z.shape,
            generator=generator,
            dtype=z.dtype,
            device=generator.device if generator is not None else "cpu",
        ).to(z.device)
        grad, t_shifted = self.gradient(
            z.detach(), t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
        )
        grad, prior_nonfinite = math.sanitize_gradient(grad, self.grad_clip)
        return DistillOutput(
            loss=math.surrogate_loss(z, grad),
            grad=grad,
            timesteps=t,
            shifted_timesteps=t_shifted,
            prior_nonfinite=prior_nonfinite,
        )

    def weight(
        self, alphas_cumprod: Float[Tensor, "T"], t: Int[Tensor, "B"]
    ) -> Float[Tensor, "B 1 1 1"]:
        return math.timestep_weight(gather_abar(alphas_cumprod, t), self.weighting)

    def predict_at_t(
        self,
        z: Float[Tensor, "B C h w"],
        t: Int[Tensor, "B"],
        eps: Float[Tensor, "B C h w"],
        conditions: ConditionPair,
        predict: PredictFn,
        alphas_cumprod: Float[Tensor, "T"],
    ) -> tuple[Tensor, Tensor]:
        """``eps_cond(x_t, t)`` and ``eps_uncond(x_t, t)`` from one batched prior call
        (``eps_cond`` Perp-Neg-corrected when the conditions carry view negatives)."""
        x_t = math.add_noise(z, eps, gather_abar(alphas_cumprod, t))
        return combine_guidance(
            predict_batched(predict, guidance_queries(x_t, t, conditions)), conditions
        )

    @abc.abstractmethod
    def gradient(
        self,
        z: Float[Tensor, "B C h w"],
        t: Int[Tensor, "B"],
        eps: Float[Tensor, "B C h w"],
        conditions: ConditionPair,
        predict: PredictFn,
        alphas_cumprod: Float[Tensor, "T"],
        t_min: int,
        group_size: int,
        generator: torch.Generator | None,
    ) -> tuple[Float[Tensor, "B C h w"], Int[Tensor, "B"] | None]:
        """The method's update ``grad`` (before sanitising) and, for ASD, the shifted timesteps."""
