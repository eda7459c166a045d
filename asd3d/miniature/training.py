"""Training of the miniature prior (``python train_prior.py``; docs/miniature-prior.md).

The standard DDPM objective (Ho et al. 2020; REFERENCE.md §1's forward process
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``): ``E ||eps_hat(x_t, t, y, pi) - eps||^2`` with
``t`` uniform over SD's 1000 timesteps, ``x0`` a ground-truth render of prompt ``y`` from camera
``pi`` in ``[-1, 1]``, and the prompt replaced by the empty prompt on a ``condition_dropout``
fraction of rows so that one network also gives the unconditional prediction (classifier-free
guidance). The camera is never dropped: both CFG branches see it, as in MVDream.
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


def run_prior_training(cfg: DictConfig) -> dict:
    """Train, checkpoint, export and evaluate the miniature prior; returns the evaluation."""
    from diffusers.training_utils import EMAModel

    from asd3d.miniature.evaluation import evaluate_pretrained

    _check(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))
    data = dataset_from_config(cfg)
    encoder = instantiate(cfg.text_encoder)
    prompt_tokens = encoder.encode(list(data.prompts)).tokens  # P x L x D
    empty_tokens = encoder.encode([""]).tokens  # 1 x L x D
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
    step, elapsed, rows = 0, 0.0, []
    if cfg.ckpt_path:
        state = load_checkpoint(cfg.ckpt_path)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        rows = _read_log(Path(cfg.ckpt_path).parent.parent / "train_log.csv", step)

    def save_checkpoint() -> None:
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
            },
            out / "checkpoints" / "last.ckpt",
        )

    batch, dropout = int(train.batch_size), float(train.condition_dropout)
    bar = tqdm(total=int(train.max_steps), initial=step, desc="training prior", unit="step")
    started, started_step = time.perf_counter(), step
    elapsed_before = elapsed
    while step < int(train.max_steps):
        index = torch.randint(len(data), (batch,), generator=generator)
        x0, prompt_ids, cameras, fovy = data.batch(index)
        t = torch.randint(0, alphas_cumprod.shape[0], (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < dropout
        tokens = torch.where(dropped.view(-1, 1, 1), empty_tokens, prompt_tokens[prompt_ids])
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
            save_checkpoint()
    bar.close()

    ema.copy_to(unet.parameters())  # the exported weights are the EMA's
    unet.eval()
    export_dir = export_pretrained(unet, cfg, list(data.prompts), step, Path(cfg.export_dir))
    if export_dir.resolve() != out.resolve():  # the recipe travels with the weights
        _write_log(export_dir / "train_log.csv", rows)
        atomic_write_text(export_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return evaluate_pretrained(export_dir, cfg)
