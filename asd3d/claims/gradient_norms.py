"""Gradient-norm distributions of SDS (CFG 100), CSD, VSD and ASD on the same renders (paper
Fig. 3, right): ``python -m asd3d.claims.gradient_norms prior=miniature``.

Each method is the project's own distiller, built from its Hydra config (``methods`` in
conf/claims/gradient_norms.yaml), and queried through :meth:`asd3d.distiller.base.Distiller.
gradient` -- the raw update ``grad = w(t) (eps_A - eps_B)`` on the prior input ``z``
(REFERENCE.md §1), before the optional clamp. Every method sees the same images and, draw by
draw, the same timesteps ``t ~ U{t_low..t_high}`` and noise ``eps``; the per-image L2 norm of
``grad`` is recorded. VSD's ``eps_phi`` is first fine-tuned on the same images with VSD's own
loss (it models the current renders; untrained it equals the prior's conditional prediction).

The paper reports SDS's gradients at CFG 100 an order of magnitude larger than ASD's
(CFG 7.5, eta 0.1): ``summary.md`` gives each method's median and that ratio.
Writes ``gradient_norms.csv`` (``method, draw, image, t, norm``), ``gradient_norms.png`` and
``summary.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from asd3d.build import resolve_device
from asd3d.claims.charts import LinePanel, Series, line_chart
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
from asd3d.distiller.base import Distiller
from asd3d.distiller.timesteps import sample_timesteps
from asd3d.distiller.vsd import VSDDistiller
from asd3d.prior.base import Prior

NAME = "gradient_norms"


@torch.no_grad()
def gradient_norms(
    prior: Prior,
    distillers: dict[str, Distiller],
    images: ClaimImages,
    num_draws: int,
    t_range: tuple[int, int],
    draws_per_call: int,
    seed: int,
    progress: bool = False,
) -> tuple[dict[str, Float[Tensor, "D B"]], Float[Tensor, "D B"]]:
    """Per method, the norm of its update on every image for ``num_draws`` draws of ``(t, eps)``
    shared by all methods; also the timesteps. ``draws_per_call`` draws are stacked into one
    batch (the procedural prior then renders each scene once per call)."""
    t_low, t_high = t_range
    generator = torch.Generator().manual_seed(int(seed))
    method_generators = {
        name: torch.Generator().manual_seed(int(seed) + 1 + i) for i, name in enumerate(distillers)
    }
    norms: dict[str, list[Tensor]] = {name: [] for name in distillers}
    timesteps: list[Tensor] = []
    batches = math.ceil(num_draws / draws_per_call)
    bar = tqdm(total=num_draws, desc="gradient draws", unit="draw", disable=not progress)
    for batch in range(batches):
        draws = min(draws_per_call, num_draws - batch * draws_per_call)
        groups = torch.arange(images.num_groups).repeat(draws)
        z, conditions = images.select(prior, groups)
        t = sample_timesteps(len(groups), images.group_size, t_low, t_high, generator, z.device)
        eps = torch.randn(z.shape, generator=generator).to(z)
        for name, distiller in distillers.items():
            grad, _ = distiller.gradient(
                z,
                t,
                eps,
                conditions,
                prior.predict_eps,
                prior.alphas_cumprod,
                t_low,
                images.group_size,
                method_generators[name],
            )
            norms[name].append(grad.flatten(1).norm(dim=1).view(draws, -1).cpu())
        timesteps.append(t.view(draws, -1).cpu())
        bar.update(draws)
    bar.close()
    return {name: torch.cat(v) for name, v in norms.items()}, torch.cat(timesteps)


def describe(distiller: Distiller) -> str:
    """The settings that shape a method's update, for the summary."""
    parts = [type(distiller).__name__.removesuffix("Distiller")]
    for attribute in ("guidance_scale", "eta", "shift_mode", "weighting"):
        if hasattr(distiller, attribute):
            parts.append(f"{attribute}={getattr(distiller, attribute)}")
    return ", ".join(parts)


def summarize(
    norms: dict[str, Float[Tensor, "D B"]],
    distillers: dict[str, Distiller],
    ratio: tuple[str, str],
    prior_name: str,
    t_range: tuple[int, int],
    note: str,
) -> tuple[str, dict[str, float]]:
    """``summary.md`` and the scalar metrics: quantiles of every method's norms and the ratio
    of the two named methods' medians."""
    rows, metrics = [], {}
    for name, values in norms.items():
        q = torch.quantile(values.flatten().double(), torch.tensor([0.1, 0.5, 0.9]).double())
        rows.append([name, describe(distillers[name]), q[1].item(), q[0].item(), q[2].item()])
        metrics[f"{name}/median"] = q[1].item()
    numerator, denominator = ratio
    value = metrics[f"{numerator}/median"] / max(metrics[f"{denominator}/median"], 1e-30)
    metrics[f"median_ratio_{numerator}_over_{denominator}"] = value
    count = next(iter(norms.values())).numel()
    text = "\n\n".join(
        [
            f"# Gradient norms, prior={prior_name} (paper Fig. 3, right)",
            f"Per-image L2 norm of each distiller's update grad = w(t) (eps_A - eps_B) on the "
            f"prior input, {count} (image, t, noise) draws per method, the same draws for every "
            f"method, t uniform in [{t_range[0]}, {t_range[1]}].",
            markdown_table(["method", "settings", "median", "10%", "90%"], rows),
            f"**Median ratio {numerator} / {denominator}: {value:.3g}** "
            "(the paper reports > 10 for SDS at CFG 100 over ASD at CFG 7.5).",
            note,
            "Files: gradient_norms.csv (method, draw, image, t, norm), gradient_norms.png "
            "(histograms over log10 norm, medians marked).",
        ]
    )
    return text + "\n", metrics


def plot_histograms(path: Path, norms: dict[str, Float[Tensor, "D B"]], bins: int = 40) -> None:
    """One histogram outline per method over shared log10-norm bins, its median as a tick on
    the top edge. Exact zeros (CSD where the conditional and unconditional predictions
    coincide) have no logarithm: the legend counts them."""
    flat = {name: v.flatten().double() for name, v in norms.items()}
    logs = {
        name: torch.log10(v[v > 0] if bool((v > 0).any()) else v.new_ones(1))
        for name, v in flat.items()
    }
    low = math.floor(min(v.min().item() for v in logs.values()))
    high = max(math.ceil(max(v.max().item() for v in logs.values())), low + 1)
    centres = [10.0 ** (low + (i + 0.5) * (high - low) / bins) for i in range(bins)]
    series = []
    for name, values in logs.items():
        zeros = int((flat[name] <= 0).sum())
        median = flat[name].median().item()
        series.append(
            Series(
                f"{name} (tick: median{f', {zeros} exact zeros' if zeros else ''})",
                centres,
                (torch.histc(values, bins, low, high) / len(flat[name])).tolist(),
                mark=median if median > 0 else None,
            )
        )
    panel = LinePanel(
        title="per-image gradient norms",
        series=series,
        x_label="per-image gradient norm (log scale)",
        y_label="fraction of draws",
        log_x=True,
        steps=True,
    )
    line_chart(path, [panel], markers=False, panel_size=(6.0, 3.6))


def build_methods(cfg: DictConfig) -> dict[str, Distiller]:
    """The distillers of ``cfg.include``, built from their ``cfg.methods`` configs."""
    include = list(cfg.include)
    unknown = [name for name in include if name not in cfg.methods]
    if unknown or not include:
        raise ValueError(
            f"include={include}: {unknown or 'nothing'} not among the configured methods "
            f"{list(cfg.methods)}; add one with +distiller@methods.<name>=<sds|csd|vsd|asd>"
        )
    ratio = list(cfg.ratio)
    if len(ratio) != 2 or any(name not in include for name in ratio):
        raise ValueError(f"ratio={ratio} must name two included methods, e.g. [sds, asd]")
    return {name: instantiate(cfg.methods[name]) for name in include}


def run_gradient_norms(cfg: DictConfig) -> dict[str, Float[Tensor, "D B"]]:
    """Measure, write and log the distributions of ``cfg`` (conf/claims/gradient_norms.yaml)."""
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    distillers = build_methods(cfg)
    t_low, t_high = (int(v) for v in cfg.t_range)
    if int(cfg.num_draws) < 1 or int(cfg.draws_per_call) < 1:
        raise ValueError(
            f"num_draws={cfg.num_draws} / draws_per_call={cfg.draws_per_call} must be >= 1"
        )
    corpus, prior = build_claim_prior(cfg, device)
    if not 0 <= t_low <= t_high < prior.num_train_timesteps:
        raise ValueError(
            f"t_range={[t_low, t_high]} must satisfy 0 <= low <= high <= "
            f"{prior.num_train_timesteps - 1} (the prior's last timestep)"
        )
    images = images_from_config(cfg.images, cfg, prior, corpus, device)
    notes = []
    for name, distiller in distillers.items():
        distiller.to(device)
        if isinstance(distiller, VSDDistiller):
            losses = fine_tune_particle(
                distiller,
                prior,
                images,
                int(cfg.vsd_particle.steps),
                int(cfg.vsd_particle.batch_size),
                int(cfg.seed),
                bool(cfg.progress),
                f"fitting {name}'s eps_phi to the renders",
            )
            tail = losses[-10:]
            notes.append(
                f"{name}: eps_phi ({type(distiller.particle).__name__}) fitted to the same images "
                f"for {len(losses)} steps of VSD's loss"
                + (f" (loss {losses[0]:.4g} -> {sum(tail) / len(tail):.4g})." if losses else ".")
            )
    norms, timesteps = gradient_norms(
        prior,
        distillers,
        images,
        int(cfg.num_draws),
        (t_low, t_high),
        int(cfg.draws_per_call),
        int(cfg.seed),
        bool(cfg.progress),
    )
    out = Path(cfg.out_dir)
    rows = [
        [name, draw, image, int(timesteps[draw, image]), f"{values[draw, image].item():.6g}"]
        for name, values in norms.items()
        for draw in range(values.shape[0])
        for image in range(values.shape[1])
    ]
    columns = ["method", "draw", "image", "t", "norm"]
    write_csv(out / f"{NAME}.csv", columns, rows)
    plot_histograms(out / f"{NAME}.png", norms, int(cfg.histogram_bins))
    notes.append(
        f"Images: {images.num_groups * images.group_size} ground-truth renders "
        f"({cfg.images.views_per_prompt} random cameras per prompt, camera seed "
        f"{cfg.images.camera_seed}) at {cfg.system.render_resolution}², encoded by the prior."
    )
    summary, metrics = summarize(
        norms,
        distillers,
        (cfg.ratio[0], cfg.ratio[1]),
        str(cfg.prior_name),
        (t_low, t_high),
        " ".join(notes),
    )
    publish(cfg, NAME, metrics, (columns, rows), {"histogram": out / f"{NAME}.png"}, summary)
    return norms


@hydra.main(version_base="1.3", config_path="../../conf", config_name="claims/gradient_norms")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_gradient_norms(cfg)
    print((Path(cfg.out_dir) / "summary.md").read_text())
    print(f"written to {cfg.out_dir}")


if __name__ == "__main__":
    main()
