"""Training callbacks: a progress bar counted in optimisation steps."""

from __future__ import annotations

import pytorch_lightning as pl
from tqdm import tqdm


class StepProgressBar(pl.Callback):
    """One bar over ``max_steps`` (not per epoch: a corpus of 16 prompts is an epoch of 4 steps),
    showing the loss, the sampled timestep range and the latest validation metrics."""

    def __init__(self, refresh_every_n_steps: int = 5) -> None:
        self.refresh_every_n_steps = max(1, refresh_every_n_steps)
        self._bar: tqdm | None = None
        self._postfix: dict[str, str] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._bar = tqdm(
                total=trainer.max_steps,
                initial=trainer.global_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        if trainer.global_step % self.refresh_every_n_steps == 0:
            metrics = trainer.callback_metrics
            for key, name in (("loss", "loss"), ("train/t", "t")):
                if key in metrics:
                    self._postfix[name] = f"{float(metrics[key]):.3g}"
            self._bar.set_postfix(self._postfix, refresh=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is None:
            return
        metrics = trainer.callback_metrics
        for key, name in (("val/oracle_r1", "R@1"), ("val/psnr", "PSNR")):
            if key in metrics:
                self._postfix[name] = f"{float(metrics[key]):.3g}"
        self._bar.set_postfix(self._postfix, refresh=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
