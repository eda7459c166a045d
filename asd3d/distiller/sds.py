"""Score Distillation Sampling (DreamFusion), the baseline of the paper's Tab. 3, and MVDream's
SDS* (the same update with the CFG prediction rescaled; REFERENCE.md §1)."""

from __future__ import annotations

from asd3d.distiller import math
from asd3d.distiller.base import Distiller
from asd3d.prior.schedule import gather_abar


class SDSDistiller(Distiller):
    """``grad = w(t) (eps_cfg(x_t, t) - eps)`` with classifier-free guidance ``guidance_scale``
    (paper Eq. 3; the release uses 100 for SD). One prior call: conditional + unconditional rows
    (plus Perp-Neg's two view negatives when the prior sends them).

    Args:
        guidance_scale: CFG scale ``s`` of ``eps_uncond + s (eps_cond - eps_uncond)``.
        guidance_rescale: ``phi`` of MVDream's SDS*: the CFG prediction's clean-image estimate is
            std-matched to the conditional one's over each group of views and mixed with factor
            ``phi`` (:func:`asd3d.distiller.math.rescale_guidance_x0`); 0 is plain SDS, the MVDream
            release uses 0.5 with CFG 50 and the ``recon`` weighting.
    """

    def __init__(self, guidance_scale: float, guidance_rescale: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        guidance_rescale = float(guidance_rescale)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(
                f"distiller.guidance_rescale={guidance_rescale} is outside [0, 1]; "
                "MVDream's SDS* uses 0.5, plain SDS 0"
            )
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = guidance_rescale

    def gradient(
        self, z, t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
    ):
        eps_cond, eps_uncond = self.predict_at_t(z, t, eps, conditions, predict, alphas_cumprod)
        guided = math.classifier_free_guidance(eps_cond, eps_uncond, self.guidance_scale)
        if self.guidance_rescale > 0.0:
            abar = gather_abar(alphas_cumprod, t)
            x_t = math.add_noise(z, eps, abar)
            guided = math.rescale_guidance_x0(
                guided, eps_cond, x_t, abar, self.guidance_rescale, group_size
            )
        return math.sds_gradient(guided, eps, self.weight(alphas_cumprod, t)), None
