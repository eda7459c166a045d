"""Sampling of the distillers' randomness: timesteps ``t``, ASD's shift ``dt`` and noise ``eps``.

Kept beside the pure gradient math so that tests can call the math with chosen values.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

SHIFT_MODES = ("random", "deterministic", "none")


def sample_timesteps(
    num_groups: int,
    group_size: int,
    t_min: int,
    t_max: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> Int[Tensor, "B"]:
    """``t ~ U{t_min..t_max}`` (inclusive), one draw per group of ``group_size`` views
    (MVDream's 4 views of a prompt share ``t``), repeated so ``B = num_groups * group_size``."""
    if not 0 <= t_min <= t_max:
        raise ValueError(
            f"timestep range [{t_min}, {t_max}] is empty or negative; need 0 <= T_min <= T_max"
        )
    t = torch.randint(
        t_min,
        t_max + 1,
        (num_groups,),
        generator=generator,
        device=generator.device if generator is not None else "cpu",
    )
    return t.to(device).repeat_interleave(group_size)


def sample_timestep_shift(
    t: Int[Tensor, "B"],
    t_min: int,
    eta: float,
    mode: str,
    group_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None,
) -> Int[Tensor, "B"]:
    """ASD's shift (Alg. 1): ``random`` draws ``dt ~ U[0, eta (t - T_min)]``, ``deterministic``
    takes ``dt = eta (t - T_min)``, ``none`` takes 0; floored to an integer, one draw per group,
    and clamped so that ``t + dt <= num_train_timesteps - 1``."""
    if mode not in SHIFT_MODES:
        raise ValueError(f"unknown shift mode {mode!r}; use one of {', '.join(SHIFT_MODES)}")
    span = eta * (t[::group_size] - t_min).clamp_min(0).float()
    if mode == "random":
        u = torch.rand(
            span.shape,
            generator=generator,
            device=generator.device if generator is not None else "cpu",
        ).to(t.device)
        span = span * u
    elif mode == "none":
        span = torch.zeros_like(span)
    dt = span.floor().long().repeat_interleave(group_size)
    return torch.minimum(t + dt, torch.full_like(t, num_train_timesteps - 1)) - t
