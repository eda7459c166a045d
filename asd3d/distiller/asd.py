"""Asynchronous Score Distillation (ScaleDreamer, ECCV 2024; Alg. 1)."""

from __future__ import annotations

from asd3d.distiller import math
from asd3d.distiller.base import (
    Distiller,
    Query,
    combine_guidance,
    guidance_queries,
    predict_batched,
)
from asd3d.distiller.timesteps import SHIFT_MODES, sample_timestep_shift
from asd3d.prior.schedule import gather_abar


class ASDDistiller(Distiller):
    """``grad = w(t) (eps_cfg(x_t, t) - eps_cond(x_{t+dt}, t+dt))`` with shared noise (Eq. 8).

    Args:
        guidance_scale: CFG of the ``t`` branch (7.5 in the release); the shifted branch uses 1.
        eta: shift ratio, ``dt`` up to ``eta (t - T_min)``; must be in ``[0, 1]`` (0.1 released).
        shift_mode: ``random`` (the method), ``deterministic`` or ``none`` (Tab. 4 ablations).

    One prior call with three blocks of rows: cond@t, uncond@t, cond@t+dt (mixed timesteps);
    five with Perp-Neg (its two view negatives at t come before the shifted block).
    """

    def __init__(
        self, guidance_scale: float, eta: float, shift_mode: str = "random", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"distiller.eta={eta} is outside [0, 1]; the paper uses 0.1 (ablations 0, 0.2)"
            )
        if shift_mode not in SHIFT_MODES:
            raise ValueError(
                f"distiller.shift_mode={shift_mode!r} is unknown; use one of {', '.join(SHIFT_MODES)}"
            )
        self.guidance_scale = float(guidance_scale)
        self.eta = eta
        self.shift_mode = shift_mode

    def gradient(
        self, z, t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
    ):
        dt = sample_timestep_shift(
            t, t_min, self.eta, self.shift_mode, group_size, alphas_cumprod.shape[0], generator
        )
        t_shifted = t + dt
        x_t = math.add_noise(z, eps, gather_abar(alphas_cumprod, t))
        x_shifted = math.add_noise(z, eps, gather_abar(alphas_cumprod, t_shifted))
        *at_t, eps_cond_shifted = predict_batched(
            predict,
            [
                *guidance_queries(x_t, t, conditions),
                Query(x_shifted, t_shifted, conditions.positive),
            ],
        )
        eps_cond, eps_uncond = combine_guidance(at_t, conditions)
        guided = math.classifier_free_guidance(eps_cond, eps_uncond, self.guidance_scale)
        grad = math.asd_gradient(guided, eps_cond_shifted, self.weight(alphas_cumprod, t))
        return grad, t_shifted
