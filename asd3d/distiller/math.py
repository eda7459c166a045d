"""The gradient math of score distillation, as pure functions of explicit inputs.

Notation (ScaleDreamer, Sec. 3): ``z`` is the prior's input (latents or pixels), ``eps`` the
injected noise, ``abar_t`` the DDPM cumulative product, ``x_t = sqrt(abar_t) z + sqrt(1-abar_t) eps``
(Eq. 1), ``w(t)`` the timestep weight. Every method's update direction is
``grad = w(t) (eps_A - eps_B)`` (Eqs. 3-7); it enters training through the reparameterised
surrogate ``0.5 ||z - stopgrad(z - grad)||^2 / B``, whose gradient w.r.t. ``z`` is ``grad / B``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

WEIGHTINGS = ("sds", "uniform", "fantasia", "recon")


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


def perpendicular_component(
    x: Float[Tensor, "B C h w"], y: Float[Tensor, "B C h w"]
) -> Float[Tensor, "B C h w"]:
    """The part of ``x`` orthogonal to ``y``, per sample: ``x - (<x, y> / <y, y>) y``.

    ``<y, y>`` is floored at 1e-6 (as threestudio's helper), so ``y = 0`` leaves ``x`` unchanged.
    """
    dims = tuple(range(1, x.ndim))
    coefficient = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coefficient * y


def perp_neg_conditional(
    eps_cond: Float[Tensor, "B C h w"],
    eps_uncond: Float[Tensor, "B C h w"],
    eps_negatives: Sequence[Float[Tensor, "B C h w"]],
    weights: Float[Tensor, "B K"],
) -> Float[Tensor, "B C h w"]:
    """Perp-Neg (Armandpour et al. 2023) folded into an effective conditional prediction.

    With ``e_pos = eps_cond - eps_uncond`` and ``e_k = eps_neg_k - eps_uncond``, returns
    ``eps_cond + sum_k w_k perp(e_k, e_pos)``, so that the usual CFG of it,
    ``eps_uncond + s (e_pos + sum_k w_k perp(e_k, e_pos))``, is exactly the guided prediction of
    threestudio / ScaleDreamer's Perp-Neg, and CSD's ``s (eps_cond' - eps_uncond)`` is its
    classifier direction. Negative weights push away from the view negatives (the release's
    effective weight is ``-0.5 f_k(r)``, see :mod:`asd3d.prior.view_prompts`).
    """
    if len(eps_negatives) != weights.shape[1]:
        raise ValueError(
            f"{len(eps_negatives)} negative predictions but {weights.shape[1]} weights"
        )
    e_pos = eps_cond - eps_uncond
    out = eps_cond
    for k, eps_negative in enumerate(eps_negatives):
        w = weights[:, k].to(eps_cond.dtype).view(-1, *([1] * (eps_cond.ndim - 1)))
        out = out + w * perpendicular_component(eps_negative - eps_uncond, e_pos)
    return out


def rescale_guidance_x0(
    eps_guided: Float[Tensor, "B C h w"],
    eps_cond: Float[Tensor, "B C h w"],
    x_t: Float[Tensor, "B C h w"],
    abar: Float[Tensor, "B 1 1 1"],
    rescale: float,
    group_size: int = 1,
) -> Float[Tensor, "B C h w"]:
    """MVDream's SDS* guidance rescale (the CFG rescale of Lin et al.,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", applied in x0 space).

    Both predictions are mapped to clean-image estimates ``x0 = (x_t - sqrt(1-abar) eps) /
    sqrt(abar)``; the guided one is scaled so that its standard deviation matches the
    conditional one's, then mixed with factor ``phi``:
    ``x0* = phi (std(x0_cond) / std(x0_cfg)) x0_cfg + (1 - phi) x0_cfg`` (each std + 1e-8).
    The std is taken jointly over each group of ``group_size`` consecutive rows (MVDream's 4
    views of one prompt; 1 = per sample), as MVDream-threestudio's
    ``multiview_diffusion_guidance.py`` (``recon_std_rescale``, unbiased ``torch.std``) does.
    Returns the noise prediction ``eps* = (x_t - sqrt(abar) x0*) / sqrt(1 - abar)`` that
    reconstructs ``x0*``, so SDS* is ``w(t) (eps* - eps)``; ``phi = 0`` gives ``eps_guided`` back.
    """
    if eps_guided.shape[0] % group_size:
        raise ValueError(f"batch {eps_guided.shape[0]} is not a multiple of group {group_size}")
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    x0_guided = (x_t - sigma * eps_guided) / alpha
    x0_cond = (x_t - sigma * eps_cond) / alpha
    groups = eps_guided.shape[0] // group_size

    def group_std(x: Tensor) -> Tensor:
        return x.reshape(groups, -1).std(dim=1) + 1e-8

    factor = (group_std(x0_cond) / group_std(x0_guided)).repeat_interleave(group_size)
    factor = factor.view(-1, *([1] * (x0_guided.ndim - 1)))
    x0_star = rescale * factor * x0_guided + (1.0 - rescale) * x0_guided
    return (x_t - alpha * x0_star) / sigma


def timestep_weight(abar: Float[Tensor, "B 1 1 1"], kind: str) -> Float[Tensor, "B 1 1 1"]:
    """``w(t)``: ``sds`` = ``1 - abar_t`` (DreamFusion, used by the release), ``uniform`` = 1,
    ``fantasia`` = ``sqrt(abar_t) (1 - abar_t)`` (Fantasia3D), ``recon`` =
    ``sqrt((1 - abar_t) / abar_t)``: MVDream's x0-reconstruction loss ``0.5 ||z - x0_hat||^2``
    has gradient ``z - x0_hat = sqrt((1 - abar)/abar) (eps_hat - eps)`` (MVDream Sec. 3.2)."""
    if kind == "recon":
        return ((1.0 - abar) / abar).sqrt()
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
) -> tuple[Float[Tensor, "B C h w"], Int[Tensor, ""]]:
    """``nan_to_num`` then an optional element-wise clamp to ``[-clip, clip]`` (as the release).

    Returns the sanitized update and the number of non-finite elements it replaced by 0, as a
    device tensor (reading it here would stall the step). Those come from the prior (a NaN/inf
    noise prediction): the distillers log them as ``train/prior_nonfinite`` and the system warns
    about them on logging steps, rather than zeroing them silently.
    """
    nonfinite = (~torch.isfinite(grad)).sum()
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None:
        grad = grad.clamp(-clip, clip)
    return grad, nonfinite


def surrogate_loss(
    z: Float[Tensor, "B C h w"], grad: Float[Tensor, "B C h w"]
) -> Float[Tensor, ""]:
    """``0.5 sum((z - stopgrad(z - grad))^2) / B``, whose gradient w.r.t. ``z`` is ``grad / B``."""
    target = (z - grad).detach()
    return 0.5 * (z - target).pow(2).sum() / z.shape[0]
