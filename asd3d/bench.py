"""``make bench``: prior-call batch composition, the system's overhead over a bare PyTorch loop,
and DDP scaling on CPU.

* batch composition = for every distiller YAML, with and without Perp-Neg, how many prior (UNet)
  calls one step makes and how many rows each carries, counted by wrapping the prior's predict
  function (``--sections composition`` runs only this, in a second).

The other two are reported as ratios (the machines are noisy; nothing here is asserted in tests):

* overhead = time per step of ``DistillationSystem`` under the Lightning Trainer / time per step
  of a hand-written loop over the very same modules (target: <= 1.10);
* DDP scaling = prompts per second with 2 processes (gloo, one thread each) / with 1 process
  (one thread) on the quickstart_exact experiment (target: >= 1.8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Writes the wall time of steps ``[warmup, max_steps)`` to ``path`` (rank 0)."""

    def __init__(self, path: str, warmup: int = 5) -> None:
        self.path, self.warmup = path, warmup
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.start is not None:
            steps = trainer.global_step - self.warmup
            Path(self.path).write_text(
                json.dumps(
                    {
                        "steps": steps,
                        "seconds": time.perf_counter() - self.start,
                        "world_size": trainer.world_size,
                    }
                )
            )


def bare_loop_seconds(system, steps: int, warmup: int) -> float:
    """The same work as ``training_step`` + Adam, without Lightning: the reference loop."""
    system.on_fit_start = lambda: None
    system.prior.to("cpu")
    rng = torch.Generator().manual_seed(0)
    optimizer = system.configure_optimizers()
    loader = system.train_dataloader()
    batches = iter(loader)
    start = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        prompts = system.embed(batch)
        cameras = system.camera_sampler.sample(len(prompts), generator=rng)
        field = system.generator(prompts, generator=rng)
        render = system.renderer(
            field, cameras, system.render_resolution, system.render_resolution, generator=rng
        )
        z = system.prior.encode_images(render.rgb, generator=rng)
        distilled = system.distiller(
            z,
            system.prior.condition(prompts, cameras),
            system.prior.predict_eps,
            system.prior.alphas_cumprod,
            step / steps,
            generator=rng,
        )
        loss = distilled.loss + system.regularisers(render, step / steps)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def system_seconds(steps: int, warmup: int, overrides: list[str]) -> float:
    out = Path(tempfile.mkdtemp(prefix="asd3d-bench-"))
    timer_file = out / "timer.json"
    from asd3d.build import build_system, compose_train_config, quiet_cpu_trainer

    cfg = compose_train_config(overrides, out)
    system = build_system(cfg, {})
    trainer = quiet_cpu_trainer(steps + warmup, callbacks=[StepTimer(str(timer_file), warmup)])
    trainer.fit(system)
    return json.loads(timer_file.read_text())["seconds"]


def ddp_prompts_per_second(devices: int, steps: int, warmup: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="asd3d-bench-ddp-"))
    timer = out / "timer.json"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=quickstart_exact",
        "logger=none",
        f"trainer.max_steps={steps + warmup}",
        "trainer.val_check_interval=100000",
        "system.image_every_n_steps=0",
        "~callbacks.checkpoint",
        "~callbacks.progress_bar",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        f"hydra.run.dir={out / 'run'}",
        "+callbacks.timer._target_=asd3d.bench.StepTimer",
        f"+callbacks.timer.path={timer}",
        f"+callbacks.timer.warmup={warmup}",
    ]
    if devices > 1:
        cmd.append("trainer.strategy=ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    result = json.loads(timer.read_text())
    prompts_per_step = 4 * result["world_size"]
    return result["steps"] * prompts_per_step / result["seconds"]


COMPOSITION_DISTILLERS = ("sds", "sds_star", "csd", "asd")


class CountingPredict:
    """Wraps a prior's predict function and records the rows of every call."""

    def __init__(self, predict) -> None:
        self.predict = predict
        self.rows: list[int] = []

    def __call__(self, x_t, t, condition):
        self.rows.append(x_t.shape[0])
        return self.predict(x_t, t, condition)


def _conditions(renders: int, perp_neg: bool):
    """Per-render conditions shaped as the SD prior sends them (2 view negatives with Perp-Neg)."""
    from asd3d.cameras import CameraSampler
    from asd3d.types import Condition, ConditionPair, PerpNegConditions

    cameras = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180]).sample(renders)
    texts = tuple(f"prompt {i}" for i in range(renders))
    off = torch.zeros(renders, dtype=torch.bool)
    tokens = torch.zeros(renders, 77, 8)
    positive, negative = (
        Condition(texts, off, cameras, tokens),
        Condition(texts, ~off, cameras, tokens),
    )
    extra = None
    if perp_neg:
        extra = PerpNegConditions((positive, positive), torch.full((renders, 2), -0.5))
    return ConditionPair(positive, negative, extra)


def batch_composition(renders: int = 4) -> list[tuple[str, str, int, list[int]]]:
    """``(distiller, perp-neg, renders, rows of each prior call)`` of one step of each method."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from asd3d.prior.schedule import ddpm_alphas_cumprod

    results = []
    for name in COMPOSITION_DISTILLERS:
        distiller = instantiate(OmegaConf.load(REPO / "conf" / "distiller" / f"{name}.yaml"))
        for perp_neg in (False, True):
            predict = CountingPredict(lambda x_t, t, condition: torch.zeros_like(x_t))
            distiller(
                torch.randn(renders, 4, 8, 8),
                _conditions(renders, perp_neg),
                predict,
                ddpm_alphas_cumprod(),
                0.5,
                generator=torch.Generator().manual_seed(0),
            )
            results.append((name, "on" if perp_neg else "off", renders, predict.rows))
    return results


def print_batch_composition() -> None:
    print("prior-call batch composition (one step, 4 renders; rows counted at the prior):")
    print("  distiller  perp-neg  calls/step  rows/call  predictions/render")
    for name, perp_neg, renders, rows in batch_composition():
        per_call = "+".join(str(r) for r in rows) or "0"
        print(
            f"  {name:<10} {perp_neg:<9} {len(rows):>10}  {per_call:>9}  {sum(rows) // renders:>18}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sections",
        default="composition,overhead,ddp",
        help="comma-separated subset of composition, overhead, ddp",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if "composition" in sections:
        print_batch_composition()
    if "overhead" in sections:
        print_overhead(args.steps, args.warmup, args.repeats)
    if "ddp" in sections:
        print_ddp_scaling(args.steps, args.warmup, args.repeats)


def print_overhead(steps: int, warmup: int, repeats: int) -> None:
    overrides = ["experiment=quickstart_exact", "logger=none", "system.image_every_n_steps=0"]

    from asd3d.build import build_system, compose_train_config

    bare, system = [], []
    for _ in range(repeats):  # interleaved, best of N: the machine is shared and noisy
        bare.append(
            bare_loop_seconds(
                build_system(compose_train_config(overrides, Path(tempfile.mkdtemp())), {}),
                steps,
                warmup,
            )
        )
        system.append(system_seconds(steps, warmup, overrides))
    t_bare, t_system = min(bare) / steps, min(system) / steps
    print(f"quickstart step, bare PyTorch loop : {1000 * t_bare:7.1f} ms")
    print(f"quickstart step, asd3d system      : {1000 * t_system:7.1f} ms")
    print(f"system / bare                      : {t_system / t_bare:7.3f}  (target <= 1.10)")


def print_ddp_scaling(steps: int, warmup: int, repeats: int) -> None:
    one = max(ddp_prompts_per_second(1, steps, warmup) for _ in range(repeats))
    two = max(ddp_prompts_per_second(2, steps, warmup) for _ in range(repeats))
    print(f"prompts/s, 1 process (1 thread)    : {one:7.2f}")
    print(f"prompts/s, 2 DDP processes (gloo)  : {two:7.2f}")
    print(f"DDP 2 / 1                          : {two / one:7.3f}  (target >= 1.8)")


if __name__ == "__main__":
    main()
