"""The DDPM noise schedule shared by every prior (SD's, MVDream's and the procedural one)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Float[Tensor, "T"]:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for the schedules SD and MVDream use.

    ``scaled_linear`` (SD 2.1): betas linear in sqrt-space; ``linear``: betas linear.
    """
    if beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
            ** 2
        )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; use 'scaled_linear' or 'linear'"
        )
    return torch.cumprod(1.0 - betas, dim=0).float()


def gather_abar(
    alphas_cumprod: Float[Tensor, "T"], t: Int[Tensor, "B"]
) -> Float[Tensor, "B 1 1 1"]:
    """``abar_t`` per sample, shaped to broadcast over ``B C h w``."""
    return alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
