"""What the claim commands share: the prior and its images, VSD's fine-tuned particle, the report.

Every claim is measured on ground-truth renders of procedural prompts (their exact scenes through
the project's VolSDF renderer, :class:`asd3d.world.ground_truth.GroundTruthRenderer`) at random
training cameras, mapped to the prior's input with ``prior.encode_images`` -- the images a
perfect generator would render, whichever prior (procedural, miniature, SD, MVDream) judges them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from jaxtyping import Float, Int
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from asd3d.build import build_prior
from asd3d.cameras import CameraSampler
from asd3d.corpus.base import check_split
from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.distiller.vsd import VSDDistiller
from asd3d.io import atomic_write_text
from asd3d.prior.base import Prior
from asd3d.types import Cameras, ConditionPair, PromptBatch
from asd3d.world.ground_truth import GroundTruthRenderer

_RENDER_CHUNK = 256  # views rendered per ground-truth call (bounds memory)
_ENCODE_CHUNK = 16  # renders per encode_images call (a VAE at 512² is memory-hungry)


def build_claim_prior(cfg: DictConfig, device: torch.device) -> tuple[ProceduralCorpus, Prior]:
    """The procedural corpus (whose ground truth the images are) and the configured prior."""
    corpus = instantiate(cfg.corpus)
    if not isinstance(corpus, ProceduralCorpus):
        raise ValueError(
            f"the claim commands render ground truth, which needs corpus=procedural "
            f"(got {type(corpus).__name__}); the prior may be any"
        )
    return corpus, build_prior(cfg, corpus).to(device)


@dataclass(frozen=True)
class ClaimImages:
    """Ground-truth renders of ``G`` view groups, encoded for a prior (``B = G * V`` images).

    A view group is one prompt seen from ``V`` cameras (the camera sampler's
    ``views_per_prompt``: 1 for SD-style priors, MVDream's 4-view orbit); a prompt has as many
    groups as asked for, each with its own random cameras.
    """

    texts: tuple[str, ...]  # G: the prompt of each view group
    cameras: Cameras  # B, views of a group consecutive, views_per_prompt = V
    rgb: Float[Tensor, "B 3 H W"]
    z: Float[Tensor, "B C h w"]

    @property
    def group_size(self) -> int:
        return self.cameras.views_per_prompt

    @property
    def num_groups(self) -> int:
        return len(self.texts)

    def select(
        self, prior: Prior, groups: Int[Tensor, "K"]
    ) -> tuple[Float[Tensor, "K*V C h w"], ConditionPair]:
        """The prior inputs and conditions of view groups ``groups`` (repeats allowed), the
        conditions built by the prior itself (view suffixes, Perp-Neg, camera codes)."""
        v = self.group_size
        rows = (groups[:, None] * v + torch.arange(v)).flatten()
        cameras = replace(self.cameras.index(rows.to(self.cameras.c2w.device)), views_per_prompt=v)
        texts = tuple(self.texts[g] for g in groups.tolist())
        conditions = prior.condition(PromptBatch(ids=groups, texts=texts), cameras)
        return self.z[rows.to(self.z.device)], conditions


@torch.no_grad()
def render_claim_images(
    prior: Prior,
    corpus: ProceduralCorpus,
    ground_truth: GroundTruthRenderer,
    sampler: CameraSampler,
    resolution: int,
    split: str,
    prompt_offset: int,
    num_prompts: int | None,
    views_per_prompt: int,
    seed: int,
    device: torch.device,
) -> ClaimImages:
    """Ground truth of prompts ``prompt_offset ..`` of ``split`` at ``views_per_prompt`` random
    cameras each (drawn from ``sampler`` with ``seed``), rendered at ``resolution``."""
    split = check_split(split)
    size = corpus.size(split)
    if not 0 <= prompt_offset < size:
        raise ValueError(
            f"prompt_offset={prompt_offset} is outside the {size} prompts of split {split!r}"
        )
    stop = size if num_prompts is None else min(size, prompt_offset + int(num_prompts))
    if stop <= prompt_offset:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1 (or null: all prompts)")
    group = sampler.views_per_prompt
    if views_per_prompt < group or views_per_prompt % group:
        raise ValueError(
            f"views_per_prompt={views_per_prompt} must be a positive multiple of the camera "
            f"sampler's views_per_prompt={group} (MVDream renders 4-view groups)"
        )
    prompts = corpus.prompts(split, range(prompt_offset, stop))
    groups_per_prompt = views_per_prompt // group
    texts = tuple(text for text in prompts for _ in range(groups_per_prompt))
    generator = torch.Generator().manual_seed(int(seed))
    cameras = sampler.sample(len(texts), generator).to(device)
    view_texts = [text for text in texts for _ in range(group)]
    rgb = torch.cat(
        [
            ground_truth(
                view_texts[start : start + _RENDER_CHUNK],
                cameras.index(
                    torch.arange(start, min(start + _RENDER_CHUNK, len(view_texts)), device=device)
                ),
                resolution,
            ).rgb
            for start in range(0, len(view_texts), _RENDER_CHUNK)
        ]
    )
    generator = torch.Generator(device=device).manual_seed(int(seed))
    z = torch.cat(
        [
            prior.encode_images(rgb[start : start + _ENCODE_CHUNK], generator)
            for start in range(0, len(rgb), _ENCODE_CHUNK)
        ]
    )
    return ClaimImages(texts=texts, cameras=cameras, rgb=rgb, z=z)


def images_from_config(
    node: DictConfig,
    cfg: DictConfig,
    prior: Prior,
    corpus: ProceduralCorpus,
    device: torch.device,
) -> ClaimImages:
    """:func:`render_claim_images` with the settings of an ``images``-style config node."""
    return render_claim_images(
        prior,
        corpus,
        instantiate(cfg.ground_truth).to(device),
        instantiate(cfg.cameras),
        int(cfg.system.render_resolution),
        str(node.split),
        int(node.prompt_offset),
        None if node.num_prompts is None else int(node.num_prompts),
        int(node.views_per_prompt),
        int(node.camera_seed),
        device,
    )


def fine_tune_particle(
    distiller: VSDDistiller,
    prior: Prior,
    images: ClaimImages,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
) -> list[float]:
    """Train VSD's ``eps_phi`` (LoRA of the prior's UNet, or the residual eps-net of a network-free
    prior) on ``images`` with VSD's own loss ``L_phi`` (:meth:`VSDDistiller.particle_loss`: the
    plain noise-prediction MSE at ``t ~ U{0..T-1}``, cameras dropped with its ``camera_dropout``),
    Adam at the distiller's ``lr``; ``batch_size`` images (whole view groups) per step.

    Attaches ``distiller`` to ``prior`` first. Returns the loss of every step.
    """
    if steps < 0:
        raise ValueError(f"fine-tuning steps={steps} must be >= 0")
    groups_per_step = max(1, batch_size // images.group_size)
    distiller.attach_prior(prior)
    distiller.to(images.z.device)
    optimizer = torch.optim.Adam(distiller.optimizer_groups())
    generator = torch.Generator().manual_seed(int(seed))
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        groups = torch.randint(images.num_groups, (groups_per_step,), generator=generator)
        z, conditions = images.select(prior, groups)
        loss = distiller.particle_loss(
            z,
            conditions.positive,
            prior.predict_eps,
            prior.alphas_cumprod,
            images.group_size,
            generator,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------- the report
def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file with a header row, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(
    cfg: DictConfig,
    name: str,
    metrics: dict[str, float],
    table: tuple[Sequence[str], Sequence[Sequence[Any]]],
    images: dict[str, Path],
    summary: str,
) -> list:
    """Write ``summary.md`` into ``cfg.out_dir`` and send the run to the configured loggers.

    ``cfg.logger`` is the project's logger group (``logger=none`` by default; ``logger=wandb``:
    W&B, offline unless logged in, plus CSV). Every logger gets the resolved config and the
    scalar ``metrics`` (under ``<name>/``); loggers that take media (W&B) also get the CSV
    ``table``, the ``images`` and the summary text. Returns the loggers (finalised).
    """
    out = Path(cfg.out_dir)
    atomic_write_text(out / "summary.md", summary)
    loggers = [
        logger
        for node in (cfg.get("logger") or {}).values()
        if "_target_" in node and (logger := instantiate(node)) is not None
    ]
    run_config = OmegaConf.to_container(cfg, resolve=True)
    scalars = {f"{name}/{key}": value for key, value in metrics.items() if math.isfinite(value)}
    for logger in loggers:
        logger.log_hyperparams(run_config)
        logger.log_metrics(scalars)
        if hasattr(logger, "log_table"):
            columns, rows = table
            logger.log_table(f"{name}/table", columns=list(columns), data=[list(r) for r in rows])
            logger.log_text(f"{name}/summary", columns=["summary.md"], data=[[summary]])
        if hasattr(logger, "log_image"):
            for key, path in images.items():
                logger.log_image(f"{name}/{key}", images=[str(path)])
        logger.save()
        logger.finalize("success")
        finish = getattr(getattr(logger, "experiment", None), "finish", None)
        if finish is not None:  # W&B: close the run so offline files are complete
            finish()
    return loggers
