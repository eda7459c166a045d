"""``make bench-gpu``: one prepared check of the training step on a GPU, against its FLOP floor.

No pretrained weights are needed or read: full-size SD 2.1-base (diffusers configs) and the
MVDream 4-view UNet are built with random weights on the device and written to a scratch
directory in the layouts the priors load, so the timed step is the real code path. The prompts
are a synthetic prompt library (the text cache is warm after the warm-up, as in steady state).

Sections (each under its own time budget; a global guard stops before the limit and the JSON +
Markdown written after every measurement hold what was done):

1. ``matmul``: the bf16 matrix-product rate of this GPU (8192^3), the ceiling the floors use.
2. ``timing``: for ``df415_3dconv_sd``, ``dl17k_triplane_mvdream_1gpu`` and ``mg15_hyperingp_sd``
   (tinycudann if it imports, else ``generator.grid_backend=torch``), variants ``shipped-fp32``
   (the configs as they are), ``fast-bf16`` (``trainer.precision=bf16-mixed`` and channels-last
   priors), ``baseline-fp32`` (no TF32, no cuDNN autotuning: the former defaults), ``bf16``
   (bf16-mixed alone) and, for 3DConv, ``fast-bf16-ndhwc`` (channels-last 3D volumes too):
   median ms/step by CUDA events after a warm-up, host ms/step (the time the Python side takes
   to issue a step), peak memory, and the ratio to the recipe's FLOP floor.
3. ``sync``: ``torch.cuda.set_sync_debug_mode("warn")`` over a few non-logging steps of
   ``fast-bf16``: every synchronising call, counted by source line.
4. ``tests``: ``pytest -m gpu``.
5. ``distillers``: every distiller x recipe, 20 steps in bf16, finite loss or the error.

``--size tiny`` runs the same code with tiny networks on the CPU (the test suite does, so the
script cannot rot); its timings mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("df415_3dconv_sd", "dl17k_triplane_mvdream_1gpu", "mg15_hyperingp_sd")
DISTILLERS = ("sds", "sds_star", "csd", "asd", "vsd")  # vsd last: it adds a LoRA to the prior
#: FLOP floor of one training step (one prompt) at the H100 SXM's dense bf16 peak, 989 TFLOP/s:
#: the UNet, VAE-encoder and generator FLOPs of the step divided by that rate. The H200 has the
#: same tensor cores and clocks (only more, faster memory), so its floor is the same number; the
#: ratio to the *measured* matrix rate of the section ``matmul`` is reported beside it.
FLOOR_MS = {
    "df415_3dconv_sd": 9.7,  # SD 2.1-base, Perp-Neg (5 UNet rows), 3DConv generator
    "dl17k_triplane_mvdream_1gpu": 8.0,  # MVDream 4 views, Triplane transformer
    "mg15_hyperingp_sd": 4.8,  # SD 2.1-base, Perp-Neg, Hyper-iNGP
}
PEAK_TFLOPS = 989.0
#: In the order they run (the most telling first, should the time guard stop the rest).
VARIANTS: dict[str, list[str]] = {
    "shipped-fp32": [],
    "fast-bf16": ["trainer.precision=bf16-mixed", "prior.channels_last=true"],
    "baseline-fp32": ["system.tf32=false", "system.cudnn_benchmark=false"],
    "bf16": ["trainer.precision=bf16-mixed"],
    "fast-bf16-ndhwc": [  # 3DConv recipes only: channels-last 3D volumes on top
        "trainer.precision=bf16-mixed",
        "prior.channels_last=true",
        "generator.channels_last=true",
    ],
}
TINY_TEXT_DIM = 32
TINY_OVERRIDES: dict[str, list[str]] = {
    "common": [
        f"prior.text_dim={TINY_TEXT_DIM}",
        f"generator.text_dim={TINY_TEXT_DIM}",
        "prior.resolution=16",
        "system.render_resolution=16",
        "renderer.num_samples_stratified=8",
        "renderer.num_samples_importance=4",
    ],
    "df415_3dconv_sd": [
        "generator.z_dim=8",
        "generator.w_dim=16",
        "generator.channels={4: 8, 8: 8, 16: 4}",
        "generator.output_resolution=16",
        "generator.bias_max_resolution=8",
        "generator.feature_dim=4",
        "generator.decoder_hidden=8",
    ],
    "dl17k_triplane_mvdream_1gpu": [
        "generator.width=16",
        "generator.num_layers=2",
        "generator.num_heads=2",
        "generator.mlp_ratio=2.0",
        "generator.token_resolution=4",
        "generator.feature_dim=4",
        "generator.decoder_hidden=8",
        "prior.unet.model_channels=32",
        "prior.unet.channel_mult=[1,2]",
        "prior.unet.attention_resolutions=[1,2]",
        "prior.unet.num_res_blocks=1",
        "prior.unet.num_head_channels=8",
        "trainer.accumulate_grad_batches=1",
    ],
    "mg15_hyperingp_sd": [
        "generator.n_levels=3",
        "generator.log2_hashmap_size=8",
        "generator.base_resolution=4",
        "generator.per_level_scale=2.0",
        "generator.hypernet_hidden_features=8",
        "generator.decoder_hidden=8",
        "renderer.background.n_levels=2",
        "renderer.background.log2_hashmap_size=8",
    ],
}


# ----------------------------------------------------------------------------- random weights
def _tokenizer():
    """A CLIP tokenizer over the byte alphabet alone (no merges): every prompt still pads to 77
    tokens, which is all the timing needs; SD 2.x pads with "!"."""
    from transformers import CLIPTokenizer

    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]  # GPT-2's byte table size
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)


def _sd_components(size: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    full = size == "full"
    text_dim = 1024 if full else TINY_TEXT_DIM
    unet = UNet2DConditionModel(
        sample_size=64 if full else 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 64),
        layers_per_block=2 if full else 1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if full
        else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        if full
        else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=(5, 10, 20, 20) if full else (2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (4 if full else 2),
        up_block_types=("UpDecoderBlock2D",) * (4 if full else 2),
        block_out_channels=(128, 256, 512, 512) if full else (32, 32),
        layers_per_block=2 if full else 1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512 if full else 16,
    )
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_dim,
            intermediate_size=4096 if full else 64,
            num_hidden_layers=23 if full else 2,
            num_attention_heads=16 if full else 4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512 if full else TINY_TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def write_random_sd(root: Path, size: str, device: torch.device) -> Path:
    """SD 2.1-base's diffusers layout with random weights (stored fp16), built on ``device``."""
    from diffusers import DDPMScheduler

    with torch.device(device):
        components = _sd_components(size)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            component = component.half()
        component.save_pretrained(root / name)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )
    scheduler.save_pretrained(root / "scheduler")  # type: ignore[attr-defined]
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_random_mvdream(path: Path, size: str, device: torch.device) -> Path:
    """The MVDream 4-view UNet with random weights, as the release's single-file checkpoint."""
    from safetensors.torch import save_file

    from asd3d.prior.mvdream_unet import MVDREAM_SD21_BASE_4VIEW_CONFIG, UNET_PREFIX, MultiViewUNet

    config = dict(MVDREAM_SD21_BASE_4VIEW_CONFIG)
    if size == "tiny":  # as TINY_OVERRIDES' prior.unet.* entries
        config.update(
            model_channels=32,
            channel_mult=[1, 2],
            attention_resolutions=[1, 2],
            num_res_blocks=1,
            num_head_channels=8,
            context_dim=TINY_TEXT_DIM,
        )
    with torch.device(device):
        unet = MultiViewUNet(**config)
    state = {UNET_PREFIX + k: v.half().contiguous().cpu() for k, v in unet.state_dict().items()}
    save_file(state, str(path))
    return path


def write_prompt_library(path: Path, count: int = 8) -> Path:
    prompts = [f"a DSLR photo of object number {i}" for i in range(count)]
    path.write_text(json.dumps({"train": prompts, "val": prompts[:2], "test": prompts[:2]}))
    return path


# ----------------------------------------------------------------------------- one run
class StepClock(pl.Callback):
    """CUDA-event (or wall-clock) time of each training batch, host time to issue it, and a
    sync audit (``set_sync_debug_mode("warn")``) over the batches from ``audit_from`` on."""

    def __init__(self, warmup: int, audit_from: int | None) -> None:
        self.warmup, self.audit_from = warmup, audit_from
        self.device_ms: list[float] = []
        self.host_ms: list[float] = []
        self._events: list[tuple[Any, Any]] = []
        self._host_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.audit_from is not None and batch_idx >= self.audit_from:
            torch.cuda.set_sync_debug_mode("warn")
        self._host_start = time.perf_counter()
        if pl_module.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        host = 1000 * (time.perf_counter() - self._host_start)
        if pl_module.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)
            torch.cuda.set_sync_debug_mode("default")
        if batch_idx >= self.warmup and (self.audit_from is None or batch_idx < self.audit_from):
            self.host_ms.append(host)
            if pl_module.device.type != "cuda":
                self.device_ms.append(host)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            stop = len(self._events) if self.audit_from is None else self.audit_from
            self.device_ms = [s.elapsed_time(e) for s, e in self._events[self.warmup : stop]]


def compose(recipe: str, overrides: list[str], scratch: Path, size: str) -> Any:
    from asd3d.build import compose_train_config

    extra = [
        f"experiment={recipe}",
        f"corpus.path={scratch / 'prompts.json'}",
        f"prior.pretrained={scratch / 'sd21_base'}",
        "logger=none",
        "system.image_every_n_steps=0",
        "system.live_validation=null",
    ]
    if "mvdream" in recipe:
        extra.append(f"prior.checkpoint={scratch / 'mvdream.safetensors'}")
    if size == "tiny":
        extra += TINY_OVERRIDES["common"] + TINY_OVERRIDES[recipe]
    if recipe.startswith("mg15"):
        from asd3d.generator.hashgrid import tcnn_available

        if size == "tiny" or not tcnn_available():
            extra += ["generator.grid_backend=torch", "renderer.background.grid_backend=torch"]
    return compose_train_config(extra + overrides, scratch / "runs")


def run_steps(cfg: Any, steps: int, warmup: int, audit_steps: int, device: torch.device) -> dict:
    """Train ``warmup + steps (+ audit_steps)`` batches of ``cfg``; the measurements."""
    from asd3d.build import build_system, quiet_cpu_trainer

    pl.seed_everything(0, verbose=False)
    system = build_system(cfg, {})
    audit_from = warmup + steps if audit_steps and device.type == "cuda" else None
    clock = StepClock(warmup, audit_from)
    batches = warmup + steps + (audit_steps if audit_from is not None else 0)
    accumulate = int(cfg.trainer.accumulate_grad_batches)
    trainer = quiet_cpu_trainer(
        -(-batches // accumulate),
        accelerator=device.type,
        devices=1,
        precision=cfg.trainer.precision,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=10_000,  # timed and audited steps are non-logging steps
        limit_train_batches=batches,
        callbacks=[clock],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(system)
    syncs: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "median_ms": statistics.median(clock.device_ms) if clock.device_ms else None,
        "host_ms": statistics.median(clock.host_ms) if clock.host_ms else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "syncs": syncs if audit_from is not None else None,
        "finite_loss": bool(loss is not None and torch.isfinite(loss).item()),
    }


# ----------------------------------------------------------------------------- report
class Report:
    """Results so far, rewritten as JSON and Markdown after every measurement."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.data = out, {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, key: str, value: Any) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        self.write()

    def write(self) -> None:
        (self.out / "bench_gpu.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "bench_gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        meta, sections = self.data["meta"], self.data["sections"]
        lines = ["# asd3d bench-gpu", ""]
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
        if "matmul" in sections:
            lines += [f"bf16 matmul 8192^3: {sections['matmul']['rate']['tflops']:.0f} TFLOP/s", ""]
        if "timing" in sections:
            lines += [
                "| recipe | variant | ms/step | host ms/step | peak GiB | x floor | "
                "x floor at measured rate |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for key, r in sections["timing"].items():
                if "error" in r:
                    lines.append(f"| {key} | error: {r['error']} | | | | | |")
                    continue
                recipe, variant = key.split("/")
                lines.append(
                    f"| {recipe} | {variant} | {_f(r['median_ms'])} | {_f(r['host_ms'])} | "
                    f"{_f(r['peak_gib'], 2)} | {_f(r.get('x_floor'), 2)} | "
                    f"{_f(r.get('x_floor_measured'), 2)} |"
                )
            lines.append("")
        for name in ("sync", "tests", "distillers", "guard"):
            if name in sections:
                lines += [f"## {name}", "", "```", json.dumps(sections[name], indent=1), "```", ""]
        return "\n".join(lines)


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- main
def matmul_tflops(device: torch.device) -> float:
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1000) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "bench_results")),
        help="where bench_gpu.json/.md go (default: $OUT, else bench_results/)",
    )
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--budget-s", type=float, default=450.0, help="global time guard")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--distiller-steps", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if args.size == "full" else "cpu")
    if args.size == "full" and not torch.cuda.is_available():
        print("bench-gpu --size full needs CUDA; --size tiny runs on the CPU", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    recipes = args.recipes.split(",")
    report = Report(
        args.out,
        {
            "size": args.size,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "commit": _commit(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "floor_ms_at_989_tflops": FLOOR_MS,
        },
    )

    def left() -> float:
        return args.budget_s - (time.monotonic() - start)

    scratch = Path(tempfile.mkdtemp(prefix="asd3d-bench-gpu-"))
    write_prompt_library(scratch / "prompts.json")
    write_random_sd(scratch / "sd21_base", args.size, device)
    if any("mvdream" in r for r in recipes):
        write_random_mvdream(scratch / "mvdream.safetensors", args.size, device)
    report.add("guard", "weights_built_s", round(time.monotonic() - start, 1))

    measured = PEAK_TFLOPS
    if device.type == "cuda" and "matmul" not in skip:
        measured = matmul_tflops(device)
        report.add("matmul", "rate", {"tflops": measured})

    plan = [
        (recipe, variant)
        for variant in args.variants.split(",")
        for recipe in recipes
        if "timing" not in skip and (variant != "fast-bf16-ndhwc" or "3dconv" in recipe)
    ]
    for recipe, variant in plan:
        if left() < 0.45 * args.budget_s:  # keep time for the later sections
            report.add("guard", f"timing/{recipe}/{variant}", "skipped: time guard")
            continue
        audit = 3 if variant == "fast-bf16" else 0
        try:
            cfg = compose(recipe, VARIANTS[variant], scratch, args.size)
            result = run_steps(cfg, args.steps, args.warmup, audit, device)
            if result["median_ms"] is not None:
                result["x_floor"] = result["median_ms"] / FLOOR_MS[recipe]
                result["x_floor_measured"] = result["x_floor"] * measured / PEAK_TFLOPS
            syncs = result.pop("syncs")
            if syncs is not None:  # synchronising calls by source line, non-logging steps
                report.add("sync", recipe, syncs)
        except Exception as err:  # recorded, and the next measurement still runs
            result = {"error": _one_line(err)}
            traceback.print_exc()
        report.add("timing", f"{recipe}/{variant}", result)
        print(f"[{time.monotonic() - start:6.0f}s] {recipe}/{variant}: {result}", flush=True)

    if "tests" not in skip and device.type == "cuda":
        budget = max(min(90.0, left() - 0.25 * args.budget_s), 10.0)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=budget,
            )
            report.add("tests", "gpu", {"rc": proc.returncode, "tail": proc.stdout[-1500:]})
        except subprocess.TimeoutExpired:
            report.add("tests", "gpu", f"stopped after {budget:.0f} s")

    if "distillers" not in skip:
        for recipe in recipes:
            for distiller in DISTILLERS:
                if left() < 15:
                    report.add("guard", f"distillers/{recipe}/{distiller}", "skipped: time guard")
                    continue
                overrides = [f"distiller={distiller}", "trainer.precision=bf16-mixed"]
                try:
                    cfg = compose(recipe, overrides, scratch, args.size)
                    result = run_steps(cfg, args.distiller_steps, 0, 0, device)
                    outcome = "ok" if result["finite_loss"] else "non-finite loss"
                except Exception as err:
                    outcome = _one_line(err)
                report.add("distillers", f"{recipe}/{distiller}", outcome)
                print(f"[{time.monotonic() - start:6.0f}s] {recipe}/{distiller}: {outcome}")
    report.add("guard", "total_s", round(time.monotonic() - start, 1))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
