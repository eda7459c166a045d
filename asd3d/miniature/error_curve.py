"""The noise-prediction error curve ``e(t)`` of a prior (ScaleDreamer, Fig. 2).

``e(t) = E_{x0, eps} ||eps_hat(x_t, t, y) - eps||^2 / n`` (per element) with
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (paper Eq. 1) over clean images ``x0`` of the
prior's data. ASD's timestep shift relies on its shape: for a learned prior it falls as ``t``
grows, so the difference of two predictions at nearby timesteps is dominated by the smaller-``t``
one's error. Written as CSV (one row per ``t``) and a PNG line plot (log-scale error).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from asd3d.claims.charts import LinePanel, Series, line_chart
from asd3d.distiller.base import PredictFn
from asd3d.distiller.math import add_noise
from asd3d.io import atomic_write_text
from asd3d.prior.base import Prior
from asd3d.prior.schedule import gather_abar
from asd3d.types import Condition


@torch.no_grad()
def noise_prediction_error(
    prior: Prior,
    x0: Float[Tensor, "N C h w"],
    condition: Condition,
    timesteps: Int[Tensor, "S"],
    num_noise: int = 4,
    seed: int = 0,
    predict: PredictFn | None = None,
    timesteps_per_call: int = 1,
) -> Float[Tensor, "S"]:
    """Mean squared noise-prediction error per timestep over ``N`` images x ``num_noise`` draws.

    The same noise draws are used at every timestep, so the curve's shape is not sampling noise.
    ``predict`` replaces ``prior.predict_eps`` (e.g. a LoRA fine-tuned copy of the prior, as in
    :mod:`asd3d.claims.error_curve`); the prior still supplies the schedule. ``timesteps_per_call``
    timesteps share one prediction call (``N`` rows each; the procedural prior then renders each
    scene once per call). Runs on ``x0``'s device.
    """
    if timesteps_per_call < 1:
        raise ValueError(f"timesteps_per_call={timesteps_per_call} must be >= 1")
    predict = prior.predict_eps if predict is None else predict
    generator = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x0.shape, generator=generator).to(x0) for _ in range(num_noise)]
    alphas_cumprod = prior.alphas_cumprod.to(x0.device)
    errors = torch.zeros(len(timesteps), dtype=torch.float64)
    for eps in noises:
        for start in range(0, len(timesteps), timesteps_per_call):
            chunk = timesteps[start : start + timesteps_per_call].to(x0.device)
            t_batch = chunk.repeat_interleave(len(x0))
            eps_rows = eps.repeat(len(chunk), 1, 1, 1)
            x_t = add_noise(
                x0.repeat(len(chunk), 1, 1, 1), eps_rows, gather_abar(alphas_cumprod, t_batch)
            )
            rows = Condition.concat([condition] * len(chunk))
            error = (predict(x_t, t_batch, rows).to(eps) - eps_rows).square()
            errors[start : start + len(chunk)] += error.view(len(chunk), -1).double().mean(1).cpu()
    return (errors / num_noise).float()


def write_error_curve(
    path_stem: Path, timesteps: Int[Tensor, "S"], curves: dict[str, Float[Tensor, "S"]]
) -> None:
    """``<stem>.csv`` (columns ``t`` and one per curve) and ``<stem>.png`` (log10 error vs t)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["t", *curves])
    for i, t in enumerate(timesteps.tolist()):
        writer.writerow([t, *(f"{curve[i].item():.6g}" for curve in curves.values())])
    atomic_write_text(path_stem.with_suffix(".csv"), buffer.getvalue())
    _plot(path_stem.with_suffix(".png"), timesteps, curves)


def _plot(path: Path, timesteps: Tensor, curves: dict[str, Tensor]) -> None:
    t = timesteps.tolist()
    panel = LinePanel(
        title="noise-prediction error e(t)",
        series=[
            Series(f"e(t) {name}", t, c.clamp_min(1e-12).tolist()) for name, c in curves.items()
        ],
        x_label="timestep t",
        y_label="e(t) (log scale)",
        log_y=True,
    )
    line_chart(path, [panel], panel_size=(5.6, 3.4))
