"""Training of the miniature prior (``python train_prior.py``; docs/miniature-prior.md).

The standard DDPM objective (Ho et al. 2020; REFERENCE.md §1's forward process
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``): ``E ||eps_hat(x_t, t, y, pi) - eps||^2`` with
``t`` uniform over SD's 1000 timesteps, ``x0`` a ground-truth render of prompt ``y`` from camera
``pi`` in ``[-1, 1]``, and the prompt replaced by the empty prompt on a ``condition_dropout``
fraction of rows so that one network also gives the unconditional prediction (classifier-free
guidance). The camera is never dropped: both CFG branches see it, as in MVDream.

Two sources of images: a fixed set of ``views_per_prompt`` cached renders per train prompt
(``data.stream: null``, the 16-prompt recipe), or a :class:`~asd3d.miniature.stream.RenderStream`
of fresh renders of prompts drawn from the whole corpus (``data.stream``, the grammar-wide
recipe). ``resume_file`` names one self-contained file (model, EMA, optimizer, rate schedule,
random state, step, log) rewritten every ``resume_every_minutes``: a run that stops, on this
machine or a fresh clone elsewhere, continues from it with the same command (the stream
re-renders its buffer from the step).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from hydra.utils import instantiate
from jaxtyping import Float, Int
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from asd3d.distiller.math import add_noise
from asd3d.io import CONFIG_KEY, atomic_torch_save, atomic_write_text, load_checkpoint
from asd3d.miniature.dataset import RenderDataset, load_or_render
from asd3d.miniature.stream import RenderStream
from asd3d.prior.miniature import CLASS_LABELS, INPUT_CHANNELS, METADATA_FILE, unet_prediction
from asd3d.prior.schedule import ddpm_alphas_cumprod, gather_abar
from asd3d.schedules import warmup_cosine

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "elapsed_s", "steps_per_s")


def training_prompts(cfg: DictConfig) -> list[str]:
    """The corpus's train prompts, in corpus order (prompt index = position)."""
    corpus = instantiate(cfg.corpus)
    return corpus.prompts("train", range(corpus.size("train")))


def dataset_from_config(cfg: DictConfig) -> RenderDataset:
    """Render (or load the cached) training images the config describes."""
    settings = {
        "cameras": OmegaConf.to_container(cfg.cameras, resolve=True),
        "ground_truth": OmegaConf.to_container(cfg.ground_truth, resolve=True),
    }
    return load_or_render(
        cfg.data.cache_dir,
        training_prompts(cfg),
        int(cfg.data.views_per_prompt),
        int(cfg.data.resolution),
        instantiate(cfg.cameras),
        instantiate(cfg.ground_truth),
        int(cfg.data.seed),
        settings,
    )


def stream_from_config(cfg: DictConfig) -> RenderStream:
    """The stream of fresh training renders ``cfg.data.stream`` describes."""
    stream = cfg.data.stream
    return RenderStream(
        instantiate(cfg.corpus),
        instantiate(cfg.cameras),
        instantiate(cfg.ground_truth),
        int(cfg.data.resolution),
        int(cfg.data.seed),
        int(stream.chunk_size),
        int(stream.buffer_chunks),
        int(stream.refresh_every_n_steps),
    )


def diffusion_loss(
    unet: torch.nn.Module,
    x0: Float[Tensor, "B 3 H W"],
    t: Int[Tensor, "B"],
    eps: Float[Tensor, "B 3 H W"],
    tokens: Float[Tensor, "B L D"],
    empty_tokens: Float[Tensor, "1 L D"],
    cameras: Float[Tensor, "B 16"],
    fovy: Float[Tensor, "B"],
    alphas_cumprod: Float[Tensor, "T"],
    prediction_type: str = "epsilon",
) -> Tensor:
    """Mean squared error of the UNet's prediction: the noise (the simple DDPM loss) or
    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022, SD 2.1's target)."""
    abar = gather_abar(alphas_cumprod, t)
    x_t = add_noise(x0, eps, abar)
    pred = unet_prediction(unet, x_t, t, tokens, empty_tokens, cameras.view(-1, 4, 4), fovy)
    if prediction_type == "v_prediction":
        return torch.nn.functional.mse_loss(pred, abar.sqrt() * eps - (1.0 - abar).sqrt() * x0)
    return torch.nn.functional.mse_loss(pred, eps)


def _check(cfg: DictConfig) -> None:
    train = cfg.train
    if int(train.max_steps) < 1 or int(train.batch_size) < 1:
        raise ValueError(
            f"train.max_steps={train.max_steps} and train.batch_size={train.batch_size} "
            "must be >= 1"
        )
    if not 0.0 <= float(train.condition_dropout) < 1.0:
        raise ValueError(f"train.condition_dropout={train.condition_dropout} must be in [0, 1)")
    if cfg.schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"schedule.prediction_type={cfg.schedule.prediction_type!r} must be "
            "'epsilon' or 'v_prediction'"
        )
    if not 0.0 <= float(train.ema_decay) < 1.0:
        raise ValueError(f"train.ema_decay={train.ema_decay} must be in [0, 1)")
    if cfg.resume_file and not float(cfg.resume_every_minutes) > 0:
        raise ValueError(f"resume_every_minutes={cfg.resume_every_minutes} must be > 0")


# Sections a resume file must share with the config that resumes it (they define the run).
_RUN_SECTIONS = ("corpus", "cameras", "ground_truth", "text_encoder", "data", "unet", "schedule")


def _check_resumable(state: dict, cfg: DictConfig, path: str) -> None:
    saved = state[CONFIG_KEY]
    for section in _RUN_SECTIONS:
        # Where the cache lives and how many test prompts are scored do not change training.
        ignored = ("cache_dir", "num_test_prompts")
        ours = cast(dict, OmegaConf.to_container(cfg[section], resolve=True))
        ours = {k: v for k, v in ours.items() if k not in ignored}
        # Keys added to the config since the file was written read as null (their default).
        saved_section = {k: saved[section].get(k) for k in ours}
        if saved_section != ours:
            raise ValueError(
                f"{path} was written with other {section} settings; resume with "
                f"the config it was started with, or set resume_file to a new path"
            )


def _write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]


def export_pretrained(
    unet: UNet2DConditionModel, cfg: DictConfig, prompts: list[str], step: int, out: Path
) -> Path:
    """Write the diffusers directory ``prior=miniature`` loads: ``unet/``, ``scheduler/`` and
    ``miniature.json`` (text encoder, resolution, camera code and the training prompts)."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(out / "unet", safe_serialization=True)  # type: ignore[attr-defined]
    DDPMScheduler(
        num_train_timesteps=int(cfg.schedule.num_train_timesteps),
        beta_start=float(cfg.schedule.beta_start),
        beta_end=float(cfg.schedule.beta_end),
        beta_schedule=str(cfg.schedule.beta_schedule),
        prediction_type=str(cfg.schedule.prediction_type),
        clip_sample=False,
    ).save_pretrained(out / "scheduler")  # type: ignore[attr-defined]
    encoder = cast(dict, OmegaConf.to_container(cfg.text_encoder, resolve=True))
    metadata = {
        "text_encoder": {k: v for k, v in encoder.items() if k != "_target_"},
        "resolution": int(cfg.data.resolution),
        "class_labels": CLASS_LABELS,
        "input_channels": INPUT_CHANNELS,
        "negative_prompt": "",
        "background_rgb": list(cfg.ground_truth.background_rgb),
        "prompts": prompts,
        "steps": step,
    }
    atomic_write_text(out / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return out


def export_resume_file(path: str | Path, cfg: DictConfig, out: Path) -> Path:
    """Export the EMA weights of a resume file (a run still training) as a diffusers directory
    ``out``, so the run can be measured while it goes on."""
    from diffusers.training_utils import EMAModel

    state = load_checkpoint(path)
    _check_resumable(state, cfg, str(path))
    unet = instantiate(cfg.unet)
    ema = EMAModel(unet.parameters(), decay=float(cfg.train.ema_decay))
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    unet.eval()
    return export_pretrained(unet, cfg, [], int(state["step"]), out)


def run_prior_training(cfg: DictConfig) -> dict:
    """Train, checkpoint, export and evaluate the miniature prior; returns the evaluation."""
    from diffusers.training_utils import EMAModel

    from asd3d.miniature.evaluation import evaluate_pretrained

    _check(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))
    encoder = instantiate(cfg.text_encoder)
    empty_tokens = encoder.encode([""]).tokens  # 1 x L x D
    stream = stream_from_config(cfg) if cfg.data.stream else None
    if stream is None:
        data = dataset_from_config(cfg)
        prompt_tokens = encoder.encode(list(data.prompts)).tokens  # P x L x D
    alphas_cumprod = ddpm_alphas_cumprod(
        int(cfg.schedule.num_train_timesteps),
        float(cfg.schedule.beta_start),
        float(cfg.schedule.beta_end),
        str(cfg.schedule.beta_schedule),
    )

    train = cfg.train
    unet = instantiate(cfg.unet)
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=float(train.lr), weight_decay=float(train.weight_decay)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, int(train.warmup_steps), int(train.max_steps), float(train.lr_min_ratio)
        ),
    )
    # Warm-up (power 3/4) so the average is not dominated by the random init in a short run.
    ema = EMAModel(unet.parameters(), decay=float(train.ema_decay), use_ema_warmup=True, power=0.75)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    log_path = out / "train_log.csv"
    step, elapsed = 0, 0.0
    rows: list[dict] = []
    resume_file = Path(cfg.resume_file) if cfg.resume_file else None
    resume_from = cfg.ckpt_path or (resume_file if resume_file and resume_file.is_file() else None)
    if resume_from:
        state = load_checkpoint(resume_from)
        _check_resumable(state, cfg, str(resume_from))
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        rows = (
            state["log"]
            if "log" in state
            else _read_log(Path(resume_from).parent.parent / "train_log.csv", step)
        )
        print(f"resumed from {resume_from} at step {step}")
    if stream is not None:
        stream.start(step)
        data_size = len(stream)
    else:
        data_size = len(data)

    def save_checkpoint(path: Path) -> None:
        atomic_torch_save(
            {
                CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True),
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "elapsed_s": elapsed,
                "log": rows,
            },
            path,
        )

    def save_resume_file() -> None:
        assert resume_file is not None
        save_checkpoint(resume_file)
        _write_log(resume_file.parent / "train_log.csv", rows)

    batch, dropout = int(train.batch_size), float(train.condition_dropout)
    bar = tqdm(total=int(train.max_steps), initial=step, desc="training prior", unit="step")
    started, started_step = time.perf_counter(), step
    elapsed_before = elapsed
    last_resume_save = time.perf_counter()
    stop_at = int(train.max_steps) if cfg.stop_at_step is None else int(cfg.stop_at_step)
    while step < min(stop_at, int(train.max_steps)):
        index = torch.randint(data_size, (batch,), generator=generator)
        if stream is not None:
            x0, texts, cameras, fovy = stream.batch(index)
            batch_tokens = encoder.encode(texts).tokens
        else:
            x0, prompt_ids, cameras, fovy = data.batch(index)
            batch_tokens = prompt_tokens[prompt_ids]
        t = torch.randint(0, alphas_cumprod.shape[0], (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < dropout
        tokens = torch.where(dropped.view(-1, 1, 1), empty_tokens, batch_tokens)
        loss = diffusion_loss(
            unet,
            x0,
            t,
            eps,
            tokens,
            empty_tokens,
            cameras,
            fovy,
            alphas_cumprod,
            str(cfg.schedule.prediction_type),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), float(train.grad_clip))
        optimizer.step()
        scheduler.step()
        ema.step(unet.parameters())
        step += 1
        elapsed = elapsed_before + time.perf_counter() - started
        bar.update(1)
        if step % int(train.log_every_n_steps) == 0 or step == int(train.max_steps):
            rate = (step - started_step) / max(1e-9, time.perf_counter() - started)
            rows.append(
                {
                    "step": step,
                    "loss": f"{loss.item():.5f}",
                    "lr": f"{scheduler.get_last_lr()[0]:.3e}",
                    "grad_norm": f"{float(grad_norm):.4f}",
                    "elapsed_s": f"{elapsed:.1f}",
                    "steps_per_s": f"{rate:.3f}",
                }
            )
            bar.set_postfix(loss=f"{loss.item():.4f}")
            _write_log(log_path, rows)
        if step % int(train.checkpoint_every_n_steps) == 0 or step == int(train.max_steps):
            save_checkpoint(out / "checkpoints" / "last.ckpt")
        if resume_file is not None and (
            time.perf_counter() - last_resume_save >= 60.0 * float(cfg.resume_every_minutes)
            or step in (stop_at, int(train.max_steps))
        ):
            save_resume_file()
            last_resume_save = time.perf_counter()
        if stream is not None:
            stream.advance(step)
    bar.close()
    if step < int(train.max_steps):  # stopped early on purpose: the resume file carries on
        print(f"stopped at step {step} of {train.max_steps} (stop_at_step)")
        return {"stopped_at_step": step}

    ema.copy_to(unet.parameters())  # the exported weights are the EMA's
    unet.eval()
    prompts = list(data.prompts) if stream is None else []  # a stream has no fixed prompt list
    export_dir = export_pretrained(unet, cfg, prompts, step, Path(cfg.export_dir))
    if export_dir.resolve() != out.resolve():  # the recipe travels with the weights
        _write_log(export_dir / "train_log.csv", rows)
        atomic_write_text(export_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return evaluate_pretrained(export_dir, cfg)
