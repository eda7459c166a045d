"""The body of ``evaluate.py``: render every test prompt on an orbit and score it.

At scale (REFERENCE.md §7: 120 views per prompt, all test prompts):

* **Several processes** through Lightning Fabric: ``devices=N`` launches N processes (DDP, one
  per GPU; ``accelerator=cpu`` runs them on CPU with gloo), and under ``torchrun`` or SLURM
  Fabric picks up the cluster's ranks. Prompts are sharded by stride (prompt ``i`` on rank
  ``i % world``), without padding, so every prompt is scored once; the means come from
  torchmetrics states reduced with ``"sum"`` (identical for any number of processes).
* **Bounded memory**: the views of a prompt are rendered ``view_chunk`` at a time (the renderer
  further chunks rays); each chunk goes to CLIP at once and is kept only as ``uint8`` video
  frames (the procedural oracle also keeps the chunk's colours and silhouettes at render size).
* **Resumable**: each finished prompt writes ``prompts/<index>.json`` atomically, after its video
  and meshes. A rerun skips prompts whose record exists with the same evaluation settings and
  folds their stored metrics into the means.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from asd3d.build import Parts, build_parts, resolve_device
from asd3d.cameras import orbit_cameras
from asd3d.checkpoint import RunRecipe, check_loadable_state, compose_run_config
from asd3d.cli import remember_ddp_job_argv, user_errors
from asd3d.evaluation.clip import ClipMetrics, ClipScorer
from asd3d.evaluation.gallery import write_gallery, write_mesh_asset
from asd3d.evaluation.media import (
    contact_sheet,
    enlarge,
    image_grid,
    save_png,
    to_uint8,
    write_turntable,
)
from asd3d.evaluation.mesh import MESH_FORMATS, extract_mesh, field_kind_of, write_mesh
from asd3d.evaluation.oracle import OracleMetrics
from asd3d.io import atomic_write_text, load_checkpoint
from asd3d.types import Cameras, Field, PromptBatch, RenderOutput

TURNTABLE_FORMATS = ("mp4", "gif")
ORACLE_METRICS = ("oracle_r1", "psnr", "mask_iou")
CLIP_METRICS = ("clip_r1", "clip_sim")
#: Shorter side of turntable frames and of contact-sheet cells (nearest-neighbour upscaled);
#: larger renders are shrunk to SHEET_MAX_SIZE on the contact sheet.
TURNTABLE_MIN_SIZE, SHEET_MIN_SIZE, SHEET_MAX_SIZE = 256, 96, 192


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit]


def load_trained_parts(
    checkpoint: dict[str, Any],
    device: torch.device,
    where: str = "checkpoint",
    run_dir: Path | None = None,
) -> tuple[DictConfig, Parts]:
    """Rebuild the run's parts from the project's ``conf/`` and the checkpoint's recipe (never
    from a config stored in the file: :mod:`asd3d.checkpoint`) and load their weights.
    ``run_dir``: the training run's directory (``paths.output_dir`` of the returned config)."""
    recipe = RunRecipe.from_checkpoint(checkpoint, where)
    cfg = compose_run_config(recipe, run_dir=run_dir)
    parts = build_parts(cfg)
    state = checkpoint.get("state_dict", {})
    for name in ("generator", "renderer"):
        module = getattr(parts, name)
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        check_loadable_state(module, own, where)
        module.load_state_dict(own)
        module.to(device).eval()
    parts.prior.to(device)
    return cfg, parts


@torch.no_grad()
def prompt_field(parts: Parts, text: str, index: int, seed: int, device: torch.device) -> Field:
    """The generator's field for one prompt (latent noise seeded by ``seed``)."""
    embedding = parts.prior.encode_text([text])
    prompts = PromptBatch(
        ids=torch.tensor([index], device=device),
        texts=(text,),
        tokens=embedding.tokens.to(device),
        pooled=embedding.pooled.to(device),
    )
    return parts.generator(prompts, generator=torch.Generator(device).manual_seed(seed))


def view_chunks(cameras: Cameras, chunk: int) -> list[Cameras]:
    """The ``V`` cameras of one prompt split into chunks of at most ``chunk`` views."""
    out = []
    for start in range(0, len(cameras), chunk):
        index = torch.arange(start, min(start + chunk, len(cameras)), device=cameras.c2w.device)
        out.append(dataclasses.replace(cameras.index(index), views_per_prompt=len(index)))
    return out


@dataclass
class _Context:
    """What every prompt of one evaluation shares."""

    cfg: DictConfig
    run_cfg: DictConfig  # the training run's config, rebuilt from the checkpoint's recipe
    parts: Parts
    device: torch.device
    cameras: Cameras
    resolution: int
    seed: int
    out_dir: Path
    settings: dict[str, Any]
    background: torch.Tensor
    clip: ClipScorer | None
    text_features: torch.Tensor | None
    clip_metrics: ClipMetrics | None
    oracle_metrics: OracleMetrics | None
    field_kind: str
    radius: float
    settings_key: str = ""  # hash of ``settings``, stored in every per-prompt record

    @property
    def sheet_step(self) -> int:
        return max(1, len(self.cameras) // max(1, int(self.cfg.contact_sheet_views)))


def _stem(index: int, text: str) -> str:
    return f"{index:05d}_{_slug(text)}"


def _record_path(out_dir: Path, index: int) -> Path:
    return out_dir / "prompts" / f"{index:05d}.json"


def _finished(ctx: _Context, index: int) -> dict[str, Any] | None:
    """The stored record of a prompt finished with the same settings, else ``None``."""
    path = _record_path(ctx.out_dir, index)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("settings") == ctx.settings_key else None


def _restore(ctx: _Context, record: dict[str, Any]) -> None:
    index = int(record["index"])
    if ctx.oracle_metrics is not None:
        ctx.oracle_metrics.update(
            *(torch.tensor([record[k]], dtype=torch.float64) for k in ORACLE_METRICS)
        )
    if ctx.clip_metrics is not None:
        ctx.clip_metrics.add_prompt_means(
            torch.tensor([index]),
            torch.tensor([record["clip_sim"]]),
            torch.tensor([record["clip_r1"]]),
            torch.tensor([record["num_views"]]),
        )


def _save_strip(images: torch.Tensor, out_dir: Path, name: str) -> str:
    """Save a row of contact-sheet cells; returns its path relative to ``out_dir``."""
    cells = images.float().cpu()
    if cells.shape[-1] > SHEET_MAX_SIZE:  # 512² protocol renders: keep the sheet a sane size
        cells = torch.nn.functional.interpolate(cells, size=SHEET_MAX_SIZE, mode="area")
    cells = enlarge(cells, SHEET_MIN_SIZE)
    save_png(image_grid(cells, nrow=len(cells), pad=0), out_dir / "views" / name)
    return f"views/{name}"


@torch.no_grad()
def evaluate_prompt(ctx: _Context, index: int, text: str) -> dict[str, Any]:
    """Render, score and export one prompt; returns its record (also written to disk)."""
    parts, out = ctx.parts, ctx.out_dir
    field = prompt_field(parts, text, index, ctx.seed, ctx.device)
    frames, sheet, rgbs, opacities = [], [], [], []
    start = 0
    for cams in view_chunks(ctx.cameras, int(ctx.cfg.view_chunk)):
        render = parts.renderer(
            field,
            cams,
            ctx.resolution,
            ctx.resolution,
            background_rgb=ctx.background.expand(len(cams), 3),
        )
        frames.append(to_uint8(enlarge(render.rgb, TURNTABLE_MIN_SIZE)))
        picks = [i - start for i in range(start, start + len(cams)) if i % ctx.sheet_step == 0]
        sheet.append(render.rgb[picks].cpu())
        start += len(cams)
        if ctx.clip is not None:
            assert ctx.clip_metrics is not None and ctx.text_features is not None
            features = ctx.clip.encode_images(render.rgb)
            ids = torch.full((len(cams),), index, dtype=torch.long)
            ctx.clip_metrics.update(features, ids, ctx.text_features)
        if parts.oracle is not None:
            rgbs.append(render.rgb)
            opacities.append(render.opacity)

    stem = _stem(index, text)
    record: dict[str, Any] = {
        "index": index,
        "prompt": text,
        "num_views": len(ctx.cameras),
        "settings": ctx.settings_key,
    }
    if parts.oracle is not None:
        assert ctx.oracle_metrics is not None
        full = RenderOutput(rgb=torch.cat(rgbs), opacity=torch.cat(opacities), depth=torch.empty(0))
        scores = parts.oracle.score((text,), full, ctx.cameras)
        ctx.oracle_metrics.update(scores.r_at_1, scores.psnr, scores.iou)
        record.update(
            oracle_r1=float(scores.r_at_1[0]),
            psnr=float(scores.psnr[0]),
            mask_iou=float(scores.iou[0]),
        )
        gt, _ = parts.oracle.bank(ctx.cameras, ctx.resolution)
        own = gt[parts.oracle.own_index(text), :: ctx.sheet_step]
        record["sheet_gt"] = _save_strip(own, out, f"{stem}_gt.png")
    if ctx.clip is not None:
        assert ctx.clip_metrics is not None
        record.update(ctx.clip_metrics.prompt_scores(index))
    record["sheet"] = _save_strip(torch.cat(sheet), out, f"{stem}.png")

    video = out / "turntables" / f"{stem}.{ctx.cfg.turntable_format}"
    write_turntable(np.concatenate(frames), video, fps=int(ctx.cfg.turntable_fps))
    record["turntable"] = str(video.relative_to(out))
    _export_meshes(ctx, field, index, stem, record)
    atomic_write_text(_record_path(out, index), json.dumps(record, indent=1))
    return record


def _export_meshes(
    ctx: _Context, field: Field, index: int, stem: str, record: dict[str, Any]
) -> None:
    mesh_cfg, gallery_cfg = ctx.cfg.mesh, ctx.cfg.gallery
    if not (mesh_cfg.export or gallery_cfg.enabled):
        return

    def extract(resolution: int):
        return extract_mesh(
            field,
            ctx.radius,
            resolution=resolution,
            field_kind=ctx.field_kind,
            level=mesh_cfg.level,
            device=ctx.device,
            chunk_points=int(mesh_cfg.chunk_points),
        )

    mesh = extract(int(mesh_cfg.resolution)) if mesh_cfg.export else None
    if mesh is not None:
        paths = write_mesh(
            mesh, ctx.out_dir / "meshes" / stem, list(mesh_cfg.formats), mesh_cfg.up_axis
        )
        record["meshes"] = {k: str(p.relative_to(ctx.out_dir)) for k, p in paths.items()}
        record["mesh_faces"] = len(mesh.faces)
        record["mesh_level"] = mesh.level
        record["mesh_level_fallback"] = mesh.used_fallback_level
    if gallery_cfg.enabled:
        preview_resolution = int(gallery_cfg.mesh_resolution)
        if mesh is None or int(mesh_cfg.resolution) != preview_resolution:
            mesh = extract(preview_resolution)
        asset = ctx.out_dir / "gallery" / f"{index:05d}.js"
        write_mesh_asset(mesh, asset, f"p{index}", ctx.radius)
        record["mesh_asset"] = str(asset.relative_to(ctx.out_dir))


def _make_fabric(cfg: DictConfig):
    from lightning_fabric import Fabric

    return Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=int(cfg.num_nodes),
        strategy=cfg.strategy,
    )


def _clip_scorer(cfg: DictConfig, procedural: bool, device: torch.device) -> ClipScorer | None:
    clip_cfg = cfg.clip
    if clip_cfg.model is None:
        return None
    optional = procedural if clip_cfg.optional == "auto" else bool(clip_cfg.optional)
    try:
        return ClipScorer(
            clip_cfg.model,
            clip_cfg.pretrained,
            device=device,
            text_batch_size=int(clip_cfg.text_batch_size),
        )
    except FileNotFoundError as err:
        if not optional:
            raise
        print(f"note: CLIP metrics skipped ({err}); clip.optional=false makes this an error")
        return None


def _settings(
    cfg: DictConfig, ckpt: Path, resolution: int, cameras_cfg: dict, clip: ClipScorer | None
) -> dict:
    """Everything a per-prompt record depends on; a record made with other settings is redone."""
    stat = ckpt.stat()
    return {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "split": cfg.split,
        "resolution": resolution,
        **cameras_cfg,
        "clip": clip.describe() if clip is not None else None,
        "turntable_format": cfg.turntable_format,
        "mesh": OmegaConf.to_container(cfg.mesh, resolve=True),
        "gallery_mesh_resolution": int(cfg.gallery.mesh_resolution)
        if cfg.gallery.enabled
        else None,
    }


def _check_options(cfg: DictConfig) -> None:
    if cfg.turntable_format not in TURNTABLE_FORMATS:
        raise ValueError(f"turntable_format={cfg.turntable_format!r} is unknown; use mp4 or gif")
    for name in ("num_views", "view_chunk"):
        if int(cfg[name]) < 1:
            raise ValueError(f"{name}={cfg[name]} must be >= 1")
    unknown = [f for f in cfg.mesh.formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"mesh.formats has unknown {unknown}; use some of {list(MESH_FORMATS)}")
    if cfg.clip.optional not in ("auto", True, False):
        raise ValueError(f"clip.optional={cfg.clip.optional!r} must be auto, true or false")


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt``; rank 0 prints each mean metric as ``name=value`` on the last line."""
    torch.set_flush_denormal(True)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(hydra_dir):
        _check_options(cfg)
        ckpt_path = Path(cfg.ckpt)
        checkpoint = load_checkpoint(ckpt_path)
        RunRecipe.from_checkpoint(checkpoint, f"checkpoint {ckpt_path}")  # refuse before launching
        fabric = _make_fabric(cfg)
    remember_ddp_job_argv("evaluate_ddp")
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    with user_errors(hydra_dir):
        ctx, count = _prepare(cfg, checkpoint, ckpt_path, fabric.device)
    shard = range(rank, count, world)
    done = 0
    bar = tqdm(total=len(shard), desc="evaluating prompts", unit="prompt", disable=rank != 0)
    for index in shard:
        record = _finished(ctx, index)
        if record is not None:
            _restore(ctx, record)
            done += 1
        else:
            evaluate_prompt(ctx, index, ctx.parts.corpus.prompt(cfg.split, index))
        bar.update(1)
        bar.set_postfix(resumed=done)
    bar.close()
    means: dict[str, float] = {}
    if ctx.oracle_metrics is not None:
        means.update({k: float(v) for k, v in ctx.oracle_metrics.compute().items()})
    if ctx.clip_metrics is not None:
        means.update({k: float(v) for k, v in ctx.clip_metrics.compute().items()})
    resumed = int(fabric.all_reduce(torch.tensor(done, device=fabric.device), reduce_op="sum"))
    fabric.barrier()
    if rank == 0:
        records = _write_summary(ctx, count, means, resumed=resumed)
        if cfg.wandb:
            _log_to_training_run(ctx, records, means)
        # The last line: the metric means (scripts read it).
        print(
            " ".join(f"{k}={v:.4f}" for k, v in means.items())
            or "no metrics (corpus has no oracle)"
        )
    return means


def _log_to_training_run(
    ctx: _Context, records: list[dict[str, Any]], means: dict[str, float]
) -> None:
    """Metrics, the per-prompt table and the turntables into the training run's W&B run."""
    from asd3d.loggers import log_evaluation

    columns = ["index", "prompt", *(k for k in (*ORACLE_METRICS, *CLIP_METRICS) if k in means)]
    rows = [[record[c] for c in columns] for record in records]
    turntables = [ctx.out_dir / record["turntable"] for record in records]
    if log_evaluation(ctx.run_cfg, means, columns, rows, turntables):
        print("Logged to the training run's W&B run (eval/*)")


def _prepare(
    cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: Path, device: torch.device
) -> tuple[_Context, int]:
    run_cfg, parts = load_trained_parts(
        checkpoint, device, f"checkpoint {ckpt_path}", run_dir=ckpt_path.resolve().parent.parent
    )
    split = cfg.split
    size = parts.corpus.size(split)
    count = size if cfg.max_prompts is None else min(size, int(cfg.max_prompts))
    if count == 0:
        key, value = ("split", split) if size == 0 else ("max_prompts", cfg.max_prompts)
        raise ValueError(
            f"{key}={value}: allowed a value that leaves prompts to evaluate (the checkpoint's "
            f"corpus has {size} {split!r} prompts)"
        )
    orbit = run_cfg.system.validation
    resolution = int(cfg.resolution or orbit.resolution)
    cameras_cfg: dict[str, Any] = {
        "num_views": int(cfg.num_views),
        "elevation_deg": float(cfg.elevation_deg),
        "distance": float(cfg.distance or orbit.distance),
        "fovy_deg": float(cfg.fovy_deg or orbit.fovy_deg),
    }
    cameras = orbit_cameras(**cameras_cfg, num_prompts=1).to(device)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.resolve().parent.parent / "eval"
    clip = _clip_scorer(cfg, parts.oracle is not None, device)
    text_features = clip_metrics = None
    if clip is not None:
        # All test prompts of the split, once per process: R@1 ranks against every one of them.
        text_features = clip.encode_texts(parts.corpus.prompts(split, range(size)))
        clip_metrics = ClipMetrics(num_prompts=size).to(device)
    field_kind = cfg.mesh.field_kind
    if field_kind == "auto":
        field_kind = field_kind_of(parts.renderer)
    background = parts.oracle.background_rgb if parts.oracle else (1.0, 1.0, 1.0)
    settings = _settings(cfg, ckpt_path, resolution, cameras_cfg, clip)
    ctx = _Context(
        cfg=cfg,
        run_cfg=run_cfg,
        parts=parts,
        device=device,
        cameras=cameras,
        resolution=resolution,
        seed=int(run_cfg.seed),
        out_dir=out_dir,
        settings=settings,
        settings_key=hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
        background=torch.tensor(background, device=device),
        clip=clip,
        text_features=text_features,
        clip_metrics=clip_metrics,
        oracle_metrics=OracleMetrics().to(device) if parts.oracle is not None else None,
        field_kind=field_kind,
        radius=float(parts.renderer.radius),
    )
    return ctx, count


def _load_strip(path: Path, cells: int) -> list[torch.Tensor]:
    image = torch.from_numpy(iio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 255.0
    return list(image.chunk(cells, dim=-1))


def _write_summary(
    ctx: _Context, count: int, means: dict[str, float], resumed: int
) -> list[dict[str, Any]]:
    """Write metrics.json / .csv, the contact sheet and the gallery; returns the prompt records."""
    out, cfg = ctx.out_dir, ctx.cfg
    records = []
    for index in range(count):
        path = _record_path(out, index)
        if not path.exists():
            raise FileNotFoundError(f"prompt {index} has no record at {path}; rerun evaluate.py")
        records.append(json.loads(path.read_text()))
    metric_names = [k for k in (*ORACLE_METRICS, *CLIP_METRICS) if k in means]
    report = {
        "checkpoint": str(cfg.ckpt),
        "split": cfg.split,
        "num_prompts": len(records),
        "num_views": len(ctx.cameras),
        "resolution": ctx.resolution,
        "clip_model": ctx.clip.describe() if ctx.clip is not None else None,
        "mean": means,
        "prompts": [{k: v for k, v in r.items() if k != "settings"} for r in records],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["index", "prompt", *metric_names, "turntable"]
    writer.writerow(header)
    writer.writerows([r[h] for h in header] for r in records)
    atomic_write_text(out / "metrics.csv", buffer.getvalue())

    shown = records[: int(cfg.contact_sheet_max_prompts)]
    cells = len(range(0, len(ctx.cameras), ctx.sheet_step))
    images: list[torch.Tensor] = []
    labels: list[str] = []
    for record in shown:
        for key, label in (("sheet", record["prompt"]), ("sheet_gt", "ground truth")):
            if key in record:
                images.extend(_load_strip(out / record[key], cells))
                labels.extend([label] + [""] * (cells - 1))
    save_png(contact_sheet(images, ncols=cells, labels=labels), out / "contact_sheet.png")
    outputs = "metrics.json, metrics.csv, contact_sheet.png, turntables/"
    if cfg.mesh.export:
        outputs += ", meshes/"
    if cfg.gallery.enabled:
        title = (
            f"asd3d evaluation: {Path(str(cfg.ckpt)).name} ({cfg.split}, {len(records)} prompts)"
        )
        write_gallery(out, records, metric_names, means, title)
        outputs += ", index.html"
    if resumed:
        print(f"Resumed: {resumed} prompt(s) were already evaluated with these settings")
    print(f"Evaluation written to {out} ({outputs})")
    return records


def run_mesh_export(cfg: DictConfig) -> dict[str, Path]:
    """The body of ``export_mesh.py``: one prompt's mesh in every configured format."""
    torch.set_flush_denormal(True)
    with user_errors(Path(HydraConfig.get().runtime.output_dir)):
        ckpt_path = Path(cfg.ckpt)
        checkpoint = load_checkpoint(ckpt_path)
        device = resolve_device(str(cfg.device))
        run_cfg, parts = load_trained_parts(checkpoint, device, f"checkpoint {ckpt_path}")
        if cfg.prompt is not None:
            text, index = str(cfg.prompt), int(cfg.index)
            if not text.strip():
                raise ValueError(f"prompt={text!r}: allowed a non-empty prompt")
        else:
            index = int(cfg.index)
            size = parts.corpus.size(cfg.split)
            if not 0 <= index < size:
                raise ValueError(
                    f"index={index} is outside the {size} prompts of split {cfg.split!r}"
                )
            text = parts.corpus.prompt(cfg.split, index)
        mesh_cfg = cfg.mesh
        field_kind = mesh_cfg.field_kind
        if field_kind == "auto":
            field_kind = field_kind_of(parts.renderer)
        seed = int(run_cfg.seed)
        field = prompt_field(parts, text, index, seed, device)
        mesh = extract_mesh(
            field,
            float(parts.renderer.radius),
            resolution=int(mesh_cfg.resolution),
            field_kind=field_kind,
            level=mesh_cfg.level,
            device=device,
            chunk_points=int(mesh_cfg.chunk_points),
            progress=True,
        )
        out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.resolve().parent.parent / "meshes"
        paths = write_mesh(mesh, out_dir / _slug(text), list(mesh_cfg.formats), mesh_cfg.up_axis)
    if mesh.used_fallback_level:
        reason = (
            "no level given"
            if mesh.requested_level != mesh.requested_level  # NaN: nothing requested
            else f"no surface at level {mesh.requested_level:g}"
        )
        print(f"note: {reason}; exported the level {mesh.level:.4g} (set mesh.level to choose)")
    print(f"{len(mesh.faces)} faces, {len(mesh.vertices)} vertices: {text!r}")
    for path in paths.values():
        print(f"Mesh written: {path}")
    return paths
