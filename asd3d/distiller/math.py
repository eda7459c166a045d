"""The gradient math of score distillation, as pure functions of explicit inputs.

Notation (ScaleDreamer, Sec. 3): ``z`` is the prior's input (latents or pixels), ``eps`` the
injected noise, ``abar_t`` the DDPM cumulative product, ``x_t = sqrt(abar_t) z + sqrt(1-abar_t) eps``
(Eq. 1), ``w(t)`` the timestep weight. Every method's update direction is
``grad = w(t) (eps_A - eps_B)`` (Eqs. 3-7); it enters training through the reparameterised
surrogate ``0.5 ||z - stopgrad(z - grad)||^2 / B``, whose gradient w.r.t. ``z`` is ``grad / B``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

WEIGHTINGS = ("sds", "uniform", "fantasia")


def add_noise(
    z: Float[Tensor, "B C h w"], eps: Float[Tensor, "B C h w"], abar: Float[Tensor, "B 1 1 1"]
) -> Float[Tensor, "B C h w"]:
    """Forward diffusion ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` (paper Eq. 1)."""
    return abar.sqrt() * z + (1.0 - abar).sqrt() * eps


def classifier_free_guidance(
    eps_cond: Float[Tensor, "B C h w"], eps_uncond: Float[Tensor, "B C h w"], scale: float
) -> Float[Tensor, "B C h w"]:
    """``eps_uncond + s (eps_cond - eps_uncond)`` (Ho & Salimans).

    This is the usual form; threestudio's SDS uses ``eps_cond + s (eps_cond - eps_uncond)``,
    i.e. our ``s`` equals its ``s + 1``. Computed as ``eps_cond + (s - 1)(eps_cond - eps_uncond)``
    (the same value) so that ``s = 1`` returns the conditional prediction exactly.
    """
    return eps_cond + (scale - 1.0) * (eps_cond - eps_uncond)


def timestep_weight(abar: Float[Tensor, "B 1 1 1"], kind: str) -> Float[Tensor, "B 1 1 1"]:
    """``w(t)``: ``sds`` = ``1 - abar_t`` (DreamFusion, used by the release), ``uniform`` = 1,
    ``fantasia`` = ``sqrt(abar_t) (1 - abar_t)`` (Fantasia3D)."""
    if kind == "sds":
        return 1.0 - abar
    if kind == "uniform":
        return torch.ones_like(abar)
    if kind == "fantasia":
        return abar.sqrt() * (1.0 - abar)
    raise ValueError(f"unknown weighting {kind!r}; use one of {', '.join(WEIGHTINGS)}")


def sds_gradient(
    eps_guided: Float[Tensor, "B C h w"],
    eps: Float[Tensor, "B C h w"],
    weight: Float[Tensor, "B 1 1 1"],
) -> Float[Tensor, "B C h w"]:
    """SDS (DreamFusion; paper Eq. 3): ``w(t) (eps_cfg(x_t, t) - eps)``."""
    return weight * (eps_guided - eps)


def csd_gradient(
    eps_cond: Float[Tensor, "B C h w"],
    eps_uncond: Float[Tensor, "B C h w"],
    weight: Float[Tensor, "B 1 1 1"],
    scale: float = 1.0,
) -> Float[Tensor, "B C h w"]:
    """CSD (Yu et al.; paper Eq. 5): ``w(t) s (eps_cond(x_t, t) - eps_uncond(x_t, t))``."""
    return weight * scale * (eps_cond - eps_uncond)


def asd_gradient(
    eps_guided: Float[Tensor, "B C h w"],
    eps_cond_shifted: Float[Tensor, "B C h w"],
    weight: Float[Tensor, "B 1 1 1"],
) -> Float[Tensor, "B C h w"]:
    """ASD (paper Eq. 8, Alg. 1): ``w(t) (eps_cfg(x_t, t) - eps_cond(x_{t+dt}, t+dt))``.

    Both noisy inputs share the same ``eps``; ``w`` is evaluated at ``t``. With ``dt = 0`` this
    is ``w (s - 1)(eps_cond - eps_uncond)``: CSD's direction, zero at guidance 1.
    """
    return weight * (eps_guided - eps_cond_shifted)


def sanitize_gradient(
    grad: Float[Tensor, "B C h w"], clip: float | None
) -> Float[Tensor, "B C h w"]:
    """``nan_to_num`` then an optional element-wise clamp to ``[-clip, clip]`` (as the release)."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None:
        grad = grad.clamp(-clip, clip)
    return grad


def surrogate_loss(
    z: Float[Tensor, "B C h w"], grad: Float[Tensor, "B C h w"]
) -> Float[Tensor, ""]:
    """``0.5 sum((z - stopgrad(z - grad))^2) / B``, whose gradient w.r.t. ``z`` is ``grad / B``."""
    target = (z - grad).detach()
    return 0.5 * (z - target).pow(2).sum() / z.shape[0]
