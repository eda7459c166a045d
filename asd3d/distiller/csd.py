"""Classifier Score Distillation (Yu et al., 2023), compared in the paper's Tab. 3."""

from __future__ import annotations

from asd3d.distiller import math
from asd3d.distiller.base import Distiller


class CSDDistiller(Distiller):
    """``grad = w(t) s (eps_cond(x_t, t) - eps_uncond(x_t, t))`` (paper Eq. 5; ``s = 1`` in the
    paper's comparison). One prior call: conditional + unconditional rows."""

    def __init__(self, guidance_scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.guidance_scale = float(guidance_scale)

    def gradient(
        self, z, t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
    ):
        eps_cond, eps_uncond = self.predict_at_t(z, t, eps, conditions, predict, alphas_cumprod)
        weight = self.weight(alphas_cumprod, t)
        return math.csd_gradient(eps_cond, eps_uncond, weight, self.guidance_scale), None
