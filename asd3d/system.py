"""The LightningModule: wires corpus, generator, renderer, prior and distiller; owns nothing clever.

Prompt-specific and amortized runs are the same system (prompt-specific = a corpus of one prompt
and a non-amortized generator). The frozen prior is held outside the module tree: it is never in
a checkpoint, never wrapped by DDP, and moved to the device by hand.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from asd3d.cameras import CameraSampler, orbit_cameras
from asd3d.corpus.base import Corpus
from asd3d.corpus.dataset import PromptDataset, collate_prompts
from asd3d.distiller.base import Distiller
from asd3d.evaluation.live import LiveValidation
from asd3d.evaluation.media import enlarge, image_grid, save_png
from asd3d.evaluation.oracle import OracleMetrics
from asd3d.evaluation.procedural import ProceduralOracle
from asd3d.generator.base import Generator
from asd3d.io import CONFIG_KEY, RECIPE_KEY
from asd3d.prior.base import Prior
from asd3d.regularisers import Regularisers
from asd3d.renderer.base import VolumeRenderer
from asd3d.schedules import warmup_cosine
from asd3d.transfer import to_device
from asd3d.types import PromptBatch

#: A render side, or milestones ``{fraction of max_steps: side}`` (e.g. ``{0: 64, 0.4: 256}``,
#: the release's prompt-specific 64 -> 256 at step 10k of 25k).
ResolutionSchedule = int | Mapping[float, int]


def resolution_at(schedule: ResolutionSchedule, fraction: float) -> int:
    """The render side at ``fraction`` of the run: the value of the last milestone reached."""
    if not isinstance(schedule, Mapping):
        return int(schedule)
    milestones = sorted((float(k), int(v)) for k, v in schedule.items())
    if not milestones or milestones[0][0] != 0.0 or milestones[-1][0] > 1.0:
        raise ValueError(
            f"render_resolution={dict(schedule)} must map fractions of the run in [0, 1], "
            "starting at 0, to sides, e.g. {0: 64, 0.4: 256}"
        )
    return [side for start, side in milestones if start <= fraction][-1]


class DistillationSystem(pl.LightningModule):
    """Trains a text-to-3D generator by distilling a frozen 2D prior.

    Args:
        corpus, generator, renderer, prior, distiller: the parts (one Hydra group each).
        camera_sampler: training cameras (REFERENCE.md §5).
        regularisers: sparsity / opaqueness / eikonal terms with scheduled weights.
        optimizer: a partial optimizer; finished here with one parameter group per part.
        lr_generator, lr_renderer: learning rates of the generator and the renderer's background.
        lr_final_ratio: both decay along a half cosine to this fraction of themselves at
            ``max_steps`` (1: constant, the release's setting; the distiller's own groups, e.g.
            VSD's LoRA, always keep theirs).
        render_resolution: side of the training renders, or milestones
            ``{fraction of max_steps: side}`` (:func:`resolution_at`).
        prompts_per_step: prompts per step per process (the views per prompt come from the sampler).
        max_steps: length of the run; schedules read ``global_step / max_steps``.
        oracle: ground-truth metrics, when the corpus is procedural (``None`` otherwise).
        live_validation: CLIP metrics, a per-prompt table and turntable videos of the validation
            renders for the dashboards (:class:`~asd3d.evaluation.live.LiveValidation`).
        validation: ``num_views``, ``elevation_deg``, ``distance``, ``fovy_deg``, ``resolution``
            of the validation orbit.
        image_every_n_steps: how often a grid of training renders is written/logged (0: never).
        seed: base seed; each process draws cameras and noise from ``seed + rank``.
        tf32, cudnn_benchmark: on CUDA, fp32 matrix products and convolutions on TF32 tensor
            cores, and cuDNN's autotuner (render and latent sizes are fixed within a run); no
            effect on the CPU (docs/performance.md). Off when a system is built without the YAML.
        compile: ``torch.compile`` the generator and the prior's denoiser in place (parameter
            names, hence checkpoints, unchanged).
    """

    prior: Prior  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        corpus: Corpus,
        generator: Generator,
        renderer: VolumeRenderer,
        prior: Prior,
        distiller: Distiller,
        camera_sampler: CameraSampler,
        regularisers: Regularisers,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_generator: float,
        lr_renderer: float,
        render_resolution: ResolutionSchedule,
        prompts_per_step: int,
        max_steps: int,
        validation: dict[str, Any],
        oracle: ProceduralOracle | None = None,
        live_validation: LiveValidation | None = None,
        image_every_n_steps: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        run_config: dict[str, Any] | None = None,
        lr_final_ratio: float = 1.0,
        tf32: bool = False,
        cudnn_benchmark: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < lr_final_ratio <= 1.0:
            raise ValueError(
                f"system.lr_final_ratio={lr_final_ratio} must be in (0, 1] (1: constant rates)"
            )
        self.lr_final_ratio = float(lr_final_ratio)
        self.corpus = corpus
        self.generator = generator
        self.renderer = renderer
        object.__setattr__(self, "prior", prior)  # frozen: outside the module tree on purpose
        self.distiller = distiller
        # VSD builds its trainable model on the prior here: owned by the distiller, so its
        # weights are in checkpoints and the optimiser while the prior's stay out of both.
        distiller.attach_prior(prior)
        self.camera_sampler = camera_sampler
        self.regularisers = regularisers
        self.optimizer_factory = optimizer
        self.lr_generator = lr_generator
        self.lr_renderer = lr_renderer
        resolution_at(render_resolution, 0.0)  # a malformed schedule fails at construction
        self.render_resolution = render_resolution
        self.prompts_per_step = prompts_per_step
        self.max_steps = max_steps
        self.validation = dict(validation)
        self.oracle = oracle
        self.live_validation = live_validation or LiveValidation(video_prompts=0, table=False)
        self.image_every_n_steps = image_every_n_steps
        self._prior_nonfinite: torch.Tensor | None = None  # running count, on the device
        self._prior_nonfinite_warned = 0
        self.seed = seed
        self.num_workers = num_workers
        self.run_config = run_config or {}
        self.run_recipe: dict[
            str, Any
        ] = {}  # set by train.py: what rebuilds the run (asd3d.checkpoint)
        self.val_metrics = OracleMetrics()
        self.tf32 = bool(tf32)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.compile_modules = bool(compile)
        self._rng: torch.Generator | None = None
        self._camera_rng: torch.Generator | None = None

    # ------------------------------------------------------------------ data
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = PromptDataset(self.corpus, "train")
        # Each rank takes its own shard of prompts (DESIGN.md §4); the sampler only holds indices.
        sampler: DistributedSampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=False
        )
        return DataLoader(
            dataset,
            batch_size=self.prompts_per_step,
            sampler=sampler,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = PromptDataset(self.corpus, "test")
        # Strided shards without the padding DistributedSampler adds, so each test prompt counts once.
        shard = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(shard, batch_size=self.prompts_per_step, collate_fn=collate_prompts)

    def transfer_batch_to_device(
        self, batch: PromptBatch, device: torch.device, dataloader_idx: int
    ) -> PromptBatch:
        return dataclasses.replace(batch, ids=to_device(batch.ids, device))

    # ------------------------------------------------------------------ helpers
    @property
    def fraction(self) -> float:
        """Progress through the run in [0, 1]: what every schedule reads."""
        return min(self.global_step / max(self.max_steps, 1), 1.0)

    def embed(self, prompts: PromptBatch) -> PromptBatch:
        """Attach the prior's text embeddings (token states and pooled vector) to the prompts."""
        embedding = self.prior.encode_text(list(prompts.texts))
        # No-ops (no copy) when already there: the batch was moved, network priors return
        # embeddings on their device, which on_fit_start made this one.
        return PromptBatch(
            ids=prompts.ids.to(self.device),
            texts=prompts.texts,
            tokens=embedding.tokens.to(self.device),
            pooled=embedding.pooled.to(self.device),
        )

    def _use_cuda_fast_path(self) -> None:
        """TF32 and cuDNN autotuning for this process, when the run is on CUDA."""
        if self.device.type != "cuda":
            return
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def setup(self, stage: str) -> None:
        if self.compile_modules:
            # In place (nn.Module.compile): state_dict keys stay those of the eager modules.
            self.generator.compile()
            self.prior.compile_denoiser()

    def on_fit_start(self) -> None:
        self._use_cuda_fast_path()
        self.prior.to(self.device)
        self.val_metrics.reset()  # ddp_spawn may share metric state across ranks (STACK.md)
        self._rng = None  # seeded on the first step, once a resumed global_step is known
        self._camera_rng = None

    def on_validation_start(self) -> None:
        self._use_cuda_fast_path()
        self.prior.to(self.device)
        if self.live_validation.active:
            split = "test"
            texts = self.corpus.prompts(split, range(self.corpus.size(split)))
            self.live_validation.start(texts, self.device)

    # ------------------------------------------------------------------ training
    def _step_generator(self) -> torch.Generator:
        """Cameras, noise and timesteps of this process: seeded by seed, rank and the first step,
        so a resumed run continues with fresh draws instead of replaying its start."""
        if self._rng is None:
            rank, _ = self._rank_and_world()
            seed = self.seed + rank + 1_000_003 * self.global_step
            self._rng = torch.Generator(device=self.device).manual_seed(seed)
        return self._rng

    def _camera_generator(self) -> torch.Generator:
        """Where cameras are drawn: the step's generator on the CPU; on a GPU a CPU generator
        with the same seed, so cameras are made on the host (their angles stay there for
        view-dependent prompting) and reach the device in one copy."""
        rng = self._step_generator()
        if rng.device.type == "cpu":
            return rng
        if self._camera_rng is None:
            self._camera_rng = torch.Generator().manual_seed(rng.initial_seed())
        return self._camera_rng

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        rng = self._step_generator()
        prompts = self.embed(batch)
        cameras = self.camera_sampler.sample(
            len(prompts), generator=self._camera_generator(), device=self.device
        )
        field = self.generator(prompts, generator=rng)
        side = resolution_at(self.render_resolution, self.fraction)
        render = self.renderer(field, cameras, side, side, generator=rng)
        z = self.prior.encode_images(render.rgb, generator=rng)
        distilled = self.distiller(
            z,
            self.prior.condition(prompts, cameras),
            self.prior.predict_eps,
            self.prior.alphas_cumprod,
            self.fraction,
            group_size=cameras.views_per_prompt,
            generator=rng,
        )
        regularisation = self.regularisers(render, self.fraction)
        loss = distilled.loss + regularisation["total"]
        if distilled.aux_loss is not None:  # the distiller's own model (VSD's LoRA) trains too
            loss = loss + distilled.aux_loss

        logs = {"train/loss": loss.detach(), "train/distill_loss": distilled.loss.detach()}
        logs.update({f"train/{k}": v.detach() for k, v in distilled.metrics().items()})
        logs.update(
            {f"train/reg_{k}": v.detach() for k, v in regularisation.items() if k != "total"}
        )
        t_min, t_max = self.distiller.timestep_range(self.fraction)
        logs.update({"train/t_min": float(t_min), "train/t_max": float(t_max)})
        self.log_dict(logs, prog_bar=False, batch_size=len(prompts))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(prompts))
        if distilled.prior_nonfinite is not None:
            self._count_prior_nonfinite(distilled.prior_nonfinite)
        if self.image_every_n_steps and self.global_step % self.image_every_n_steps == 0:
            self._log_images("train/renders", render.rgb.detach())
        return loss

    def _count_prior_nonfinite(self, count: torch.Tensor) -> None:
        """Add up the prior's NaN/inf values on the device (no read-back); warn about new ones on
        logging steps only, where the logs are read back anyway."""
        total = count if self._prior_nonfinite is None else self._prior_nonfinite + count
        self._prior_nonfinite = total
        if not self.trainer._logger_connector.should_update_logs:
            return
        seen = int(total)
        if seen > self._prior_nonfinite_warned:
            warnings.warn(
                f"step {self.global_step}: the prior's predictions held {seen} non-finite values "
                f"so far ({seen - self._prior_nonfinite_warned} since the last warning); they "
                "were set to 0 (train/prior_nonfinite)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._prior_nonfinite_warned = seen

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Only on steps whose logs are written: a few fused kernels (one per dtype and device)
        # instead of one norm per parameter, and nothing at all on the other steps.
        if not self.trainer._logger_connector.should_update_logs:
            return
        grads = [p.grad.detach() for p in self.generator.parameters() if p.grad is not None]
        if grads:
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            self.log("train/grad_norm_generator", norms.norm(), batch_size=1)

    def configure_optimizers(self) -> Any:
        groups = [
            {
                "params": [p for p in self.generator.parameters() if p.requires_grad],
                "lr": self.lr_generator,
                "name": "generator",
            }
        ]
        renderer_params = [p for p in self.renderer.parameters() if p.requires_grad]
        if renderer_params:
            groups.append({"params": renderer_params, "lr": self.lr_renderer, "name": "renderer"})
        decayed = len(groups)
        groups.extend(self.distiller.optimizer_groups())  # e.g. VSD's LoRA, with its own lr
        optimizer = self.optimizer_factory(groups)
        if self.lr_final_ratio == 1.0:
            return optimizer
        factors = [self.lr_factor] * decayed + [lambda _: 1.0] * (len(groups) - decayed)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def lr_factor(self, step: int) -> float:
        """Half-cosine decay from 1 at step 0 to ``lr_final_ratio`` at ``max_steps``."""
        return warmup_cosine(step, 0, self.max_steps, self.lr_final_ratio)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if self.oracle is None and not self.live_validation.active:
            return
        prompts = self.embed(batch)
        cfg = self.validation
        cameras = orbit_cameras(
            cfg["num_views"],
            cfg["elevation_deg"],
            cfg["distance"],
            cfg["fovy_deg"],
            num_prompts=len(prompts),
        ).to(self.device)
        field = self.generator(
            prompts, generator=torch.Generator(self.device).manual_seed(self.seed)
        )
        # The ground truth's background (white), as evaluation renders.
        rgb = self.oracle.background_rgb if self.oracle is not None else (1.0, 1.0, 1.0)
        background = torch.tensor(rgb, device=self.device).expand(len(cameras), 3)
        side = resolution_at(cfg["resolution"], self.fraction)
        render = self.renderer(field, cameras, side, side, background_rgb=background)
        per_prompt: dict[str, torch.Tensor] = {}
        if self.oracle is not None:
            metrics = self.oracle.score(
                prompts.texts, render, cameras.index(torch.arange(cfg["num_views"]))
            )
            self.val_metrics.update(metrics.r_at_1, metrics.psnr, metrics.iou)
            per_prompt = {
                "oracle_r1": metrics.r_at_1,
                "psnr": metrics.psnr,
                "mask_iou": metrics.iou,
            }
        if self.live_validation.active:
            self.live_validation.update(batch.ids, prompts.texts, render.rgb, per_prompt)
        if batch_idx == 0:
            self._log_images("val/renders", render.rgb[:: cfg["num_views"] // 4 or 1])

    def on_validation_epoch_end(self) -> None:
        values: dict[str, torch.Tensor] = {}
        if self.oracle is not None:
            values.update(self.val_metrics.compute())
            self.val_metrics.reset()
        values.update(self.live_validation.compute())
        if values:
            self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False, batch_size=1)
        if self.live_validation.active and not self.trainer.sanity_checking:
            self.live_validation.log(
                self.loggers,
                self.global_step,
                Path(self.trainer.default_root_dir) / "videos",
                self.trainer.is_global_zero,
            )

    # ------------------------------------------------------------------ outputs
    def _log_images(self, key: str, images: torch.Tensor) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        grid = image_grid(enlarge(images.float().cpu(), 96), nrow=min(8, len(images)))
        out_dir = Path(self.trainer.default_root_dir) / "images"
        save_png(grid, out_dir / f"{key.replace('/', '_')}_{self.global_step:06d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key=key, images=[grid.permute(1, 2, 0).numpy()], step=self.global_step
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The recipe travels with the weights: evaluate.py and resuming need only the checkpoint.
        # The resolved config is a record for people; nothing is built from it.
        checkpoint[RECIPE_KEY] = self.run_recipe
        checkpoint[CONFIG_KEY] = self.run_config

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, overrides: tuple[str, ...] = ()
    ) -> DistillationSystem:
        """The system of a ``train.py`` checkpoint, rebuilt from the project's ``conf/`` with the
        checkpoint's recipe (group choices and overrides; ``overrides`` on top) -- never from a
        config stored in the file (:mod:`asd3d.checkpoint`)."""
        from asd3d.checkpoint import load_trained_system

        return load_trained_system(checkpoint_path, overrides, map_location)
