"""The noise-prediction error curve of a prior and of a LoRA fine-tuned copy (paper Fig. 2):
``python -m asd3d.claims.error_curve prior=miniature``.

``e(t) = E ||eps_hat(x_t, t, y) - eps||^2 / n`` (:func:`asd3d.miniature.error_curve.
noise_prediction_error`) on ground-truth renders of the corpus prompts at held-out random
cameras, for the prior and for a copy carrying VSD's ``eps_phi`` (the LoRA on the prior's UNet,
camera-conditioned; the residual eps-net for the network-free procedural prior) fine-tuned with
VSD's own noise-prediction MSE on renders at other cameras (``fine_tune`` in the config). The
paper's observation, which ASD's timestep shift relies on: a learned prior's ``e(t)`` falls as
``t`` grows, so ``eps(t) - eps(t + dt)`` is dominated by the error at the smaller ``t``.

Writes ``error_curve.csv`` (``t``, ``prior_conditional``, ``prior_unconditional``,
``lora_conditional``, ``lora_unconditional``), ``error_curve.png`` (log error vs ``t``),
``fine_tune_loss.csv`` and ``summary.md`` into the run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from jaxtyping import Float, Int
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from asd3d.build import resolve_device
from asd3d.claims.shared import (
    ClaimImages,
    build_claim_prior,
    fine_tune_particle,
    images_from_config,
    markdown_table,
    publish,
    write_csv,
)
from asd3d.cli import user_errors
from asd3d.distiller.base import PredictFn
from asd3d.distiller.vsd import VSDDistiller
from asd3d.miniature.error_curve import noise_prediction_error, write_error_curve
from asd3d.prior.base import Prior
from asd3d.types import Condition

NAME = "error_curve"


def particle_predictor(distiller: VSDDistiller, prior: Prior, unconditional: bool) -> PredictFn:
    """``eps_phi`` of a fine-tuned VSD distiller as a ``predict`` function, without autograd.

    Conditional rows get the prompt (without view suffixes) and their camera; unconditional rows
    the negative prompt and no camera -- the two predictions VSD's particle CFG combines.
    """
    particle = distiller.particle
    if particle is None:
        raise RuntimeError("fine-tune the distiller (attach it to the prior) first")

    @torch.no_grad()
    def predict(x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        camera = condition.cameras.flat_matrix().to(x_t)
        if unconditional:
            camera = torch.zeros_like(camera)
        else:
            condition = particle.particle_condition(condition)
        return particle.eps(prior.predict_eps, x_t, t, condition, camera)

    return predict


def measure_curves(
    prior: Prior,
    distiller: VSDDistiller | None,
    images: ClaimImages,
    timesteps: Int[Tensor, "S"],
    num_noise: int,
    seed: int,
    timesteps_per_call: int = 1,
    progress: bool = False,
) -> dict[str, Float[Tensor, "S"]]:
    """``e(t)`` of the prior (and of ``distiller``'s fine-tuned ``eps_phi`` when given) on
    ``images``, conditional and unconditional, with the same noise draws for every curve.
    ``progress``: a bar over the prediction calls of all curves."""
    x0, conditions = images.select(prior, torch.arange(images.num_groups))
    branches = (("conditional", conditions.positive), ("unconditional", conditions.negative))
    predictors: dict[str, tuple[PredictFn, Condition]] = {
        f"prior_{name}": (prior.predict_eps, condition) for name, condition in branches
    }
    if distiller is not None:
        for name, condition in branches:
            predict = particle_predictor(distiller, prior, unconditional=name == "unconditional")
            predictors[f"lora_{name}"] = (predict, condition)
    calls = num_noise * -(-len(timesteps) // timesteps_per_call)  # per curve
    bar = tqdm(
        total=calls * len(predictors), desc="measuring e(t)", unit="call", disable=not progress
    )
    curves = {}
    for curve, (predict, condition) in predictors.items():
        bar.set_postfix_str(curve)

        def counted(x_t: Tensor, t: Tensor, rows: Condition, predict=predict) -> Tensor:
            bar.update(1)
            return predict(x_t, t, rows)

        curves[curve] = noise_prediction_error(
            prior, x0, condition, timesteps, num_noise, seed, counted, timesteps_per_call
        )
    bar.close()
    return curves


def summarize(
    timesteps: Int[Tensor, "S"], curves: dict[str, Float[Tensor, "S"]], prior_name: str, note: str
) -> tuple[str, dict[str, float]]:
    """``summary.md`` and the scalar metrics: each curve's ends, whether it falls from the first
    to the last timestep, and whether it falls at every step."""
    first, last = int(timesteps[0]), int(timesteps[-1])
    rows, metrics = [], {}
    for name, curve in curves.items():
        start, end = curve[0].item(), curve[-1].item()
        decreases = end < start
        monotone = bool((curve[1:] <= curve[:-1]).all())
        rows.append([name, start, end, "yes" if decreases else "no", "yes" if monotone else "no"])
        metrics[f"{name}/t{first}"] = start
        metrics[f"{name}/t{last}"] = end
        metrics[f"{name}/decreases"] = float(decreases)
    columns = ["curve", f"e(t={first})", f"e(t={last})", "decreases", "monotone"]
    text = "\n\n".join(
        [
            f"# Noise-prediction error e(t), prior={prior_name} (paper Fig. 2)",
            "e(t) = mean over images, noise draws and elements of ||eps_hat(x_t, t) - eps||^2 on "
            f"ground-truth renders at held-out cameras, t from {first} to {last}. "
            '"decreases": e(last) < e(first); "monotone": e(t) never rises from one measured t '
            "to the next. The paper's claim: a learned prior's e(t) falls as t grows.",
            markdown_table(columns, rows),
            note,
            "Files: error_curve.csv, error_curve.png (log10 e(t) vs t), fine_tune_loss.csv.",
        ]
    )
    return text + "\n", metrics


def run_error_curve(cfg: DictConfig) -> dict[str, Float[Tensor, "S"]]:
    """Measure, write and log the curves of ``cfg`` (conf/claims/error_curve.yaml)."""
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    measure = cfg.measure
    t_low, t_high = (int(v) for v in measure.t_range)
    if not 0 <= t_low < t_high or int(measure.num_points) < 2:
        raise ValueError(
            f"measure.t_range={[t_low, t_high]} / measure.num_points={measure.num_points}: need "
            "0 <= low < high (at most the prior's last timestep) and at least 2 points"
        )
    corpus, prior = build_claim_prior(cfg, device)
    if t_high >= prior.num_train_timesteps:
        raise ValueError(
            f"measure.t_range={[t_low, t_high]} exceeds the prior's timesteps "
            f"0..{prior.num_train_timesteps - 1}"
        )
    timesteps = torch.linspace(t_low, t_high, int(measure.num_points)).round().long()
    heldout = images_from_config(cfg.images, cfg, prior, corpus, device)
    fine_tune = cfg.fine_tune
    distiller = None
    losses: list[float] = []
    if int(fine_tune.steps) > 0:
        distiller = instantiate(cfg.lora)
        if not isinstance(distiller, VSDDistiller):
            raise ValueError(
                f"lora must build a VSD distiller (its eps_phi is the LoRA), got "
                f"{type(distiller).__name__}; keep the default /distiller@lora: vsd"
            )
        train_images = images_from_config(fine_tune.images, cfg, prior, corpus, device)
        losses = fine_tune_particle(
            distiller,
            prior,
            train_images,
            int(fine_tune.steps),
            int(fine_tune.batch_size),
            int(cfg.seed),
            bool(cfg.progress),
            "fine-tuning the LoRA copy",
        )
    curves = measure_curves(
        prior,
        distiller,
        heldout,
        timesteps,
        int(measure.num_noise),
        int(measure.seed),
        int(measure.timesteps_per_call),
        bool(cfg.progress),
    )
    out = Path(cfg.out_dir)
    write_error_curve(out / NAME, timesteps, curves)
    write_csv(out / "fine_tune_loss.csv", ["step", "loss"], list(enumerate(losses, start=1)))
    note = (
        f"LoRA copy: VSD's eps_phi ({type(distiller.particle).__name__}) fine-tuned for "
        f"{len(losses)} steps with VSD's noise-prediction MSE on {fine_tune.images.views_per_prompt}"
        f" ground-truth views per prompt of prompts {fine_tune.images.prompt_offset}.. of split "
        f"{fine_tune.images.split!r} (camera seed {fine_tune.images.camera_seed}); loss "
        f"{losses[0]:.4g} -> {sum(losses[-10:]) / len(losses[-10:]):.4g} (mean of the last 10). "
        f"Measured on {heldout.num_groups * heldout.group_size} held-out views "
        f"(camera seed {cfg.images.camera_seed})."
        if distiller is not None and losses
        else "No LoRA copy (fine_tune.steps=0)."
    )
    summary, metrics = summarize(timesteps, curves, str(cfg.prior_name), note)
    publish(
        cfg,
        NAME,
        metrics,
        (
            ["t", *curves],
            [
                [int(t), *(float(c[i]) for c in curves.values())]
                for i, t in enumerate(timesteps.tolist())
            ],
        ),
        {"plot": out / f"{NAME}.png"},
        summary,
    )
    return curves


@hydra.main(version_base="1.3", config_path="../../conf", config_name="claims/error_curve")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_error_curve(cfg)
    print((Path(cfg.out_dir) / "summary.md").read_text())
    print(f"written to {cfg.out_dir}")


if __name__ == "__main__":
    main()
