"""The body of ``evaluate.py``: render every test prompt on an orbit and score it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from asd3d.build import Parts, as_config, build_parts
from asd3d.cameras import orbit_cameras
from asd3d.cli import user_errors
from asd3d.evaluation.media import contact_sheet, enlarge, save_png, write_turntable
from asd3d.io import atomic_write_text, load_checkpoint
from asd3d.types import Cameras, PromptBatch, RenderOutput

TURNTABLE_FORMATS = ("mp4", "gif")


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit]


def load_trained_parts(
    checkpoint: dict[str, Any], device: torch.device
) -> tuple[DictConfig, Parts]:
    """Rebuild the run's parts from the config stored in the checkpoint and load their weights."""
    cfg = as_config(checkpoint["asd3d_config"])
    parts = build_parts(cfg)
    state = checkpoint.get("state_dict", {})
    for name in ("generator", "renderer"):
        module = getattr(parts, name)
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        module.to(device).eval()
    parts.prior.to(device)
    return cfg, parts


@torch.no_grad()
def render_prompt(
    parts: Parts,
    text: str,
    index: int,
    cameras: Cameras,
    resolution: int,
    background_rgb: tuple[float, float, float],
    seed: int,
) -> RenderOutput:
    """All views of one prompt (``V x 3 x r x r``), composited over a fixed background."""
    device = cameras.c2w.device
    embedding = parts.prior.encode_text([text])
    prompts = PromptBatch(
        ids=torch.tensor([index], device=device),
        texts=(text,),
        tokens=embedding.tokens.to(device),
        pooled=embedding.pooled.to(device),
    )
    field = parts.generator(prompts, generator=torch.Generator(device).manual_seed(seed))
    background = torch.tensor(background_rgb, device=device).expand(len(cameras), 3)
    return parts.renderer(field, cameras, resolution, resolution, background_rgb=background)


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt``; prints each mean metric as ``name=value`` on the last line."""
    torch.set_flush_denormal(True)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(hydra_dir):
        ckpt_path = Path(cfg.ckpt)
        if cfg.turntable_format not in TURNTABLE_FORMATS:
            raise ValueError(
                f"turntable_format={cfg.turntable_format!r} is unknown; use mp4 or gif"
            )
        if cfg.num_views < 1:
            raise ValueError(f"num_views={cfg.num_views} must be >= 1")
        device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else ("cpu" if cfg.device == "auto" else cfg.device)
        )
        checkpoint = load_checkpoint(ckpt_path)
        run_cfg, parts = load_trained_parts(checkpoint, device)
        split = cfg.split
        size = parts.corpus.size(split)
        count = size if cfg.max_prompts is None else min(size, int(cfg.max_prompts))
    orbit = run_cfg.system.validation
    resolution = int(cfg.resolution or orbit.resolution)
    cameras = orbit_cameras(
        int(cfg.num_views),
        float(cfg.elevation_deg),
        float(cfg.distance or orbit.distance),
        float(cfg.fovy_deg or orbit.fovy_deg),
        num_prompts=1,
    ).to(device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.resolve().parent.parent / "eval"
    (out_dir / "turntables").mkdir(parents=True, exist_ok=True)
    background = parts.oracle.background_rgb if parts.oracle else (1.0, 1.0, 1.0)
    sheet_step = max(1, int(cfg.num_views) // max(1, int(cfg.contact_sheet_views)))

    per_prompt: list[dict[str, Any]] = []
    sheet_images: list[torch.Tensor] = []
    sheet_labels: list[str] = []
    for index in tqdm(range(count), desc="evaluating prompts", unit="prompt"):
        text = parts.corpus.prompt(split, index)
        render = render_prompt(
            parts, text, index, cameras, resolution, background, int(run_cfg.seed)
        )
        entry: dict[str, Any] = {"index": index, "prompt": text}
        if parts.oracle is not None:
            scores = parts.oracle.score((text,), render, cameras)
            entry.update(
                oracle_r1=float(scores.r_at_1[0]),
                psnr=float(scores.psnr[0]),
                mask_iou=float(scores.iou[0]),
            )
        video = out_dir / "turntables" / f"{index:05d}_{_slug(text)}.{cfg.turntable_format}"
        write_turntable(enlarge(render.rgb.cpu(), 256), video, fps=int(cfg.turntable_fps))
        entry["turntable"] = str(video.relative_to(out_dir))
        per_prompt.append(entry)
        views = enlarge(render.rgb[::sheet_step].cpu(), 96)
        sheet_images.extend(views)
        sheet_labels.extend([text] + [""] * (len(views) - 1))
        if parts.oracle is not None:
            gt, _ = parts.oracle.bank(cameras, resolution)
            sheet_images.extend(enlarge(gt[parts.oracle.own_index(text), ::sheet_step].cpu(), 96))
            sheet_labels.extend(["ground truth"] + [""] * (len(views) - 1))

    metric_names = [
        k for k in ("oracle_r1", "psnr", "mask_iou") if per_prompt and k in per_prompt[0]
    ]
    means: dict[str, float] = {
        k: sum(p[k] for p in per_prompt) / len(per_prompt) for k in metric_names
    }
    report = {
        "checkpoint": str(ckpt_path),
        "split": split,
        "num_prompts": len(per_prompt),
        "num_views": int(cfg.num_views),
        "resolution": resolution,
        "mean": means,
        "prompts": per_prompt,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    header = ["index", "prompt", *metric_names, "turntable"]
    rows = [",".join(header)] + [
        ",".join(json.dumps(p[h]) if h == "prompt" else str(p[h]) for h in header)
        for p in per_prompt
    ]
    atomic_write_text(out_dir / "metrics.csv", "\n".join(rows) + "\n")
    ncols = len(range(0, int(cfg.num_views), sheet_step))
    save_png(
        contact_sheet(sheet_images, ncols=ncols, labels=sheet_labels), out_dir / "contact_sheet.png"
    )
    print(
        f"Evaluation written to {out_dir} (metrics.json, metrics.csv, contact_sheet.png, turntables/)"
    )
    print(" ".join(f"{k}={v:.4f}" for k, v in means.items()) or "no metrics (corpus has no oracle)")
    return means
