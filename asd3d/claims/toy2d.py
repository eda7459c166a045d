"""The paper's 2D toy (ScaleDreamer Fig. 3 / Fig. 13): distil ONE image with each method.

    python -m asd3d.claims.toy2d prior=miniature
    python -m asd3d.claims.toy2d prompt.index=3 steps=500 run_methods=[sds,asd] logger=wandb

No 3D generator and no renderer: the optimised variable is an RGB image ``sigmoid(logits)`` in
``[0, 1]`` seen from one fixed camera, handed to the prior exactly as a render is in 3D training
(``prior.encode_images``: pixels for pixel-space priors, SD's VAE encoder for latent ones, so no
decoder is needed to look at the result). Every method is the project's own distiller
(``conf/distiller/<name>.yaml``), attached to the prior as :class:`asd3d.system.DistillationSystem`
does; VSD's LoRA / epsilon-net trains alongside the image through ``optimizer_groups`` and its
``aux_loss``. All methods share the initial image, the optimiser, the learning rate, the number of
steps and the seed. On the procedural world the ground truth of the prompt at that camera is
known, and the PSNR of the image against it is logged over the steps.

Outputs in the run directory: ``toy2d.png`` (ground truth + each method's final image),
``toy2d_progress.png`` (images over the steps, one row per method), ``toy2d.csv`` (method, step,
loss, grad norm, t, dt, aux loss, PSNR) and ``summary.md`` (final PSNR per method).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from jaxtyping import Float
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from asd3d.build import build_prior, resolve_device
from asd3d.cameras import CameraSampler
from asd3d.cli import user_errors
from asd3d.corpus.base import Corpus, check_split
from asd3d.distiller.base import Distiller
from asd3d.evaluation.media import contact_sheet, enlarge, save_png
from asd3d.evaluation.oracle import psnr
from asd3d.evaluation.procedural import ProceduralOracle
from asd3d.io import atomic_write_text
from asd3d.prior.base import Prior
from asd3d.training import instantiate_all
from asd3d.types import Cameras, ConditionPair, PromptBatch

CSV_COLUMNS = ("method", "step", "loss", "grad_norm", "t", "dt", "aux_loss", "psnr")
INITS = ("grey", "noise")
DISPLAY_SIZE = 96  # images are enlarged (nearest) to at least this side in the PNG sheets


@dataclass
class MethodRun:
    """One method's distillation of the image: its distiller, parameter, optimiser and draws."""

    name: str
    distiller: Distiller
    logits: nn.Parameter
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    rows: list[dict[str, float | int | str]] = field(default_factory=list)
    snapshots: dict[int, Tensor] = field(default_factory=dict)

    @property
    def image(self) -> Float[Tensor, "V 3 H W"]:
        """The image (one per view of the camera group) in ``[0, 1]``."""
        return torch.sigmoid(self.logits)

    def step(
        self, prior: Prior, conditions: ConditionPair, fraction: float, views: int
    ) -> dict[str, float]:
        """One optimiser step on the image (and the distiller's own model); its metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        z = prior.encode_images(self.image, generator=self.generator)
        distilled = self.distiller(
            z,
            conditions,
            prior.predict_eps,
            prior.alphas_cumprod,
            fraction,
            group_size=views,
            generator=self.generator,
        )
        loss = distilled.loss
        if distilled.aux_loss is not None:  # VSD's particle model trains in the same step
            loss = loss + distilled.aux_loss
        loss.backward()
        self.optimizer.step()
        return {
            "loss": float(distilled.loss.detach()),
            **{key: float(value.detach()) for key, value in distilled.metrics().items()},
        }


def fixed_cameras(camera: DictConfig, views: int, device: torch.device) -> Cameras:
    """The toy's one camera (``views > 1``: ``views`` cameras 360°/V apart in azimuth, as a
    multi-view prior's group), built by a :class:`CameraSampler` whose ranges are single values."""
    sampler = CameraSampler(
        distance_range=[camera.distance] * 2,
        fovy_range_deg=[camera.fovy_deg] * 2,
        elevation_range_deg=[camera.elevation_deg] * 2,
        azimuth_range_deg=[camera.azimuth_deg] * 2,
        views_per_prompt=views,
        view_layout="orbit",
    )
    return sampler.sample(1, device=device)


def initial_logits(
    views: int, resolution: int, init: str, init_std: float, seed: int
) -> Float[Tensor, "V 3 r r"]:
    """The shared starting point: logits 0 (a grey image) or seeded Gaussian logits."""
    if init not in INITS:
        raise ValueError(f"image.init={init!r} is unknown; use one of {', '.join(INITS)}")
    if init == "grey":
        return torch.zeros(views, 3, resolution, resolution)
    generator = torch.Generator().manual_seed(seed)
    return float(init_std) * torch.randn(views, 3, resolution, resolution, generator=generator)


def choose_prompt(corpus: Corpus, split: str, index: int) -> str:
    """The prompt at ``index`` of ``split``, or a one-line error naming the valid range."""
    size = corpus.size(check_split(split))
    if int(index) != index or not 0 <= int(index) < size:
        raise ValueError(
            f"prompt.index={index} is outside the {split} split of corpus {corpus.name!r}; "
            f"use 0..{size - 1}"
        )
    return corpus.prompt(split, int(index))


def check_settings(cfg: DictConfig) -> list[str]:
    """Validate the run's scalar settings; returns the method names to run."""
    names = list(cfg.run_methods)
    if not names:
        raise ValueError("run_methods is empty; name at least one of " + ", ".join(cfg.methods))
    for name in names:
        if name not in cfg.methods:
            raise ValueError(
                f"run_methods has unknown method {name!r}; use one of {', '.join(cfg.methods)} "
                "(add one as a `- /distiller@methods.<name>: <distiller config>` line of conf/claims/toy2d.yaml)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"run_methods={names} names a method twice")
    if int(cfg.steps) < 1:
        raise ValueError(f"steps={cfg.steps} must be >= 1")
    if float(cfg.lr) <= 0:
        raise ValueError(f"lr={cfg.lr} must be > 0")
    if int(cfg.log_every_n_steps) < 1:
        raise ValueError(f"log_every_n_steps={cfg.log_every_n_steps} must be >= 1")
    if int(cfg.progress_snapshots) < 2:
        raise ValueError(f"progress_snapshots={cfg.progress_snapshots} must be >= 2")
    if int(cfg.image.resolution) < 1:
        raise ValueError(f"image.resolution={cfg.image.resolution} must be >= 1")
    return names


def build_method(
    name: str, cfg: DictConfig, prior: Prior, start: Tensor, device: torch.device
) -> MethodRun:
    """Instantiate ``methods.<name>``, attach the prior and give it its own image and optimiser."""
    distiller: Distiller = instantiate(cfg.methods[name])
    distiller.attach_prior(prior)  # VSD builds its LoRA / epsilon-net here
    distiller.to(device)
    logits = nn.Parameter(start.clone().to(device))
    groups = [{"params": [logits], "lr": float(cfg.lr), "name": "image"}]
    groups.extend(distiller.optimizer_groups())
    generator = torch.Generator(device).manual_seed(int(cfg.seed))
    return MethodRun(name, distiller, logits, instantiate(cfg.optimizer)(groups), generator)


def snapshot_steps(steps: int, count: int) -> list[int]:
    """``count`` steps evenly spaced over ``[0, steps]`` (0 = the initial image), distinct."""
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


@dataclass
class ToyResult:
    """What a run measured: per method, its final PSNR (``nan`` without ground truth)."""

    prompt: str
    final_psnr: dict[str, float]
    output_dir: Path


def run_toy2d(cfg: DictConfig, output_dir: Path) -> ToyResult:
    """Distil one image with each method of ``cfg.run_methods``; write the outputs."""
    torch.set_flush_denormal(True)
    names = check_settings(cfg)
    device = resolve_device(str(cfg.device))
    corpus: Corpus = instantiate(cfg.corpus)
    split, index = str(cfg.prompt.split), cfg.prompt.index
    text = choose_prompt(corpus, split, index)
    prior: Prior = build_prior(cfg, corpus).to(device)
    views = int(cfg.cameras.views_per_prompt)
    cameras = fixed_cameras(cfg.camera, views, device)
    resolution = int(cfg.image.resolution)
    conditions = prior.condition(PromptBatch(torch.tensor([int(index)]), (text,)), cameras)
    ground_truth = None
    if ProceduralOracle.applies_to(corpus):
        renderer = instantiate(cfg.ground_truth).to(device)
        ground_truth = renderer([text] * views, cameras, resolution).rgb.clamp(0, 1)
    start = initial_logits(
        views, resolution, str(cfg.image.init), float(cfg.image.init_std), int(cfg.seed)
    )
    runs = [build_method(name, cfg, prior, start, device) for name in names]
    loggers = instantiate_all(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    steps, every = int(cfg.steps), int(cfg.log_every_n_steps)
    snapshots = set(snapshot_steps(steps, int(cfg.progress_snapshots)))

    def record(run: MethodRun, step: int, metrics: dict[str, float]) -> dict[str, float]:
        image = run.image.detach()
        if step in snapshots:
            run.snapshots[step] = image.cpu()
        if step % every and step != steps:
            return {}
        value = float(psnr(image, ground_truth).mean()) if ground_truth is not None else math.nan
        measured: dict[str, float] = {**metrics, "psnr": value}
        row: dict[str, float | int | str] = {"method": run.name, "step": step, **measured}
        run.rows.append({key: row.get(key, math.nan) for key in CSV_COLUMNS})
        return {  # loggers get the measured values only (no PSNR without ground truth)
            f"toy2d/{run.name}/{key}": number
            for key, number in measured.items()
            if not math.isnan(number)
        }

    bar = tqdm(total=steps, desc=f"toy2d: {text}", unit="step")
    for step in range(steps + 1):  # step 0: the shared initial image; step k: after update k
        logged: dict[str, float] = {}
        for run in runs:
            metrics = run.step(prior, conditions, (step - 1) / steps, views) if step else {}
            logged.update(record(run, step, metrics))
        if logged:
            for logger in loggers:
                logger.log_metrics(logged, step=step)
            if ground_truth is not None:
                bar.set_postfix({r.name: f"{r.rows[-1]['psnr']:.1f}dB" for r in runs})
        bar.update(1 if step else 0)
    bar.close()

    result = ToyResult(text, {run.name: float(run.rows[-1]["psnr"]) for run in runs}, output_dir)
    write_outputs(result, runs, ground_truth, cfg, loggers)
    for logger in loggers:
        if hasattr(logger, "finalize"):
            logger.finalize("success")
    return result


def _side_by_side(image: Float[Tensor, "V 3 H W"]) -> Float[Tensor, "3 H VW"]:
    """The views of one image next to each other, enlarged for reading."""
    return enlarge(torch.cat(list(image.float().cpu()), dim=-1), DISPLAY_SIZE)


def write_outputs(
    result: ToyResult,
    runs: list[MethodRun],
    ground_truth: Tensor | None,
    cfg: DictConfig,
    loggers: list,
) -> None:
    """``toy2d.png``, ``toy2d_progress.png``, ``toy2d.csv`` and ``summary.md``."""
    out = result.output_dir
    out.mkdir(parents=True, exist_ok=True)
    images = [_side_by_side(run.image.detach()) for run in runs]
    labels = [
        run.name.upper() + ("" if math.isnan(p) else f" {p:.1f} dB")
        for run, p in zip(runs, result.final_psnr.values())
    ]
    if ground_truth is not None:
        images.insert(0, _side_by_side(ground_truth))
        labels.insert(0, "ground truth")
    final_sheet = contact_sheet(images, ncols=len(images), labels=labels)
    save_png(final_sheet, out / "toy2d.png")

    columns = sorted(runs[0].snapshots)
    progress = [_side_by_side(run.snapshots[step]) for run in runs for step in columns]
    progress_labels = [f"{run.name.upper()} @{step}" for run in runs for step in columns]
    progress_sheet = contact_sheet(progress, ncols=len(columns), labels=progress_labels)
    save_png(progress_sheet, out / "toy2d_progress.png")

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerows(run.rows)
    atomic_write_text(out / "toy2d.csv", buffer.getvalue())
    atomic_write_text(out / "summary.md", summary_markdown(result, runs, cfg))

    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="toy2d/final", images=[final_sheet], step=int(cfg.steps))
            logger.log_image(key="toy2d/progress", images=[progress_sheet], step=int(cfg.steps))


def summary_markdown(result: ToyResult, runs: list[MethodRun], cfg: DictConfig) -> str:
    """A Markdown table of each method's final and best PSNR and its distiller settings."""
    cam = cfg.camera
    lines = [
        "# 2D toy: one image distilled by each method",
        "",
        f"Prompt: **{result.prompt}** (prior `{cfg.prior._target_.rsplit('.', 1)[-1]}`, "
        f"{cfg.image.resolution}² image, camera elevation {cam.elevation_deg}°, azimuth "
        f"{cam.azimuth_deg}°, distance {cam.distance}, fovy {cam.fovy_deg}°). "
        f"{cfg.steps} steps, {cfg.optimizer._target_.rsplit('.', 1)[-1]} lr {cfg.lr}, "
        f"seed {cfg.seed}, init {cfg.image.init}.",
        "",
        "| method | settings | PSNR at step 0 (dB) | final PSNR (dB) | best PSNR (dB) |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        settings = cfg.methods[run.name]
        described = [f"CFG {settings.guidance_scale:g}"] if "guidance_scale" in settings else []
        if "eta" in settings:
            described.append(f"eta {settings.eta:g}")
        values = [float(row["psnr"]) for row in run.rows]
        if all(math.isnan(v) for v in values):
            first, final, best = "n/a", "n/a", "n/a"
        else:
            first, final, best = (f"{v:.2f}" for v in (values[0], values[-1], max(values)))
        lines.append(
            f"| {run.name.upper()} | {', '.join(described) or '-'} | {first} | {final} | {best} |"
        )
    if all(math.isnan(v) for v in result.final_psnr.values()):
        lines += ["", "No ground truth for this corpus: PSNR is not measured."]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="claims/toy2d")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        result = run_toy2d(cfg, output_dir)
    for name, value in result.final_psnr.items():
        print(f"{name}: final PSNR {value:.2f} dB")
    print(f"2D toy written to {output_dir}")


if __name__ == "__main__":
    main()
