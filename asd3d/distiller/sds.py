"""Score Distillation Sampling (DreamFusion), the baseline of the paper's Tab. 3."""

from __future__ import annotations

from asd3d.distiller import math
from asd3d.distiller.base import Distiller


class SDSDistiller(Distiller):
    """``grad = w(t) (eps_cfg(x_t, t) - eps)`` with classifier-free guidance ``guidance_scale``
    (paper Eq. 3; the release uses 100 for SD). One prior call: conditional + unconditional rows."""

    def __init__(self, guidance_scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.guidance_scale = float(guidance_scale)

    def gradient(
        self, z, t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
    ):
        eps_cond, eps_uncond = self.predict_at_t(z, t, eps, conditions, predict, alphas_cumprod)
        guided = math.classifier_free_guidance(eps_cond, eps_uncond, self.guidance_scale)
        return math.sds_gradient(guided, eps, self.weight(alphas_cumprod, t)), None
