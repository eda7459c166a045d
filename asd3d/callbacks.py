"""Training callbacks: a progress bar counted in optimisation steps, checkpoints that survive
every exit, and a guard against non-finite steps (docs/reliability.md)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from tqdm import tqdm

from asd3d.io import remove_stale_temporaries


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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Closed now, so that the error train.py prints is the last line of the output.
        self.on_train_end(trainer, pl_module)


class TrainingStopped(Exception):
    """Training ended before ``max_steps`` on purpose; ``train.py`` prints one line and exits
    with :attr:`exit_code`."""

    exit_code = 1
    prefix = "error"


class NonFiniteTrainingError(TrainingStopped):
    """Too many consecutive steps had a non-finite loss or gradients."""


class TrainingInterrupted(TrainingStopped):
    """A signal (Ctrl-C, SIGTERM, SLURM's pre-emption SIGUSR1) stopped training after a
    checkpoint was saved; the exit status is the shell's ``128 + signal number``."""

    prefix = "interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteGuard(pl.Callback):
    """Skip every optimizer step whose loss or gradients hold NaN/inf; stop after a streak.

    A skipped step changes no weight and no optimizer state (the gradients are dropped before
    ``optimizer.step``); it is counted (``train/skipped_steps``) and warned about. After
    ``max_consecutive`` skipped steps in a row, training stops with :class:`NonFiniteTrainingError`:
    the last checkpoint written stays the last good one. Under DDP the decision is taken on all
    ranks together (any rank's non-finite value skips the step everywhere).

    Args:
        max_consecutive: skipped steps in a row that stop training (>= 1).
    """

    def __init__(self, max_consecutive: int) -> None:
        if int(max_consecutive) < 1:
            raise ValueError(
                f"callbacks.nonfinite_guard.max_consecutive={max_consecutive}: allowed an "
                "integer >= 1"
            )
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.streak = 0
        self._checks: list[torch.Tensor] = []  # finiteness of this step's losses (accumulation)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._checks.append(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        checks = [*self._checks, *(torch.isfinite(g).all() for g in grads)]
        self._checks = []
        # The one deliberate read-back of a training step: whether to take it.
        finite = bool(torch.stack(checks).all()) if checks else True
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            optimizer.zero_grad(set_to_none=True)  # no gradient: the step changes nothing
            self.skipped += 1
            self.streak += 1
            rank_zero_warn(
                f"step {trainer.global_step}: non-finite loss or gradients, optimizer step "
                f"skipped ({self.streak} in a row, {self.skipped} in this run)"
            )
            if self.streak >= self.max_consecutive:
                raise NonFiniteTrainingError(
                    f"training stopped at step {trainer.global_step}: {self.streak} consecutive "
                    "steps had a non-finite loss or gradients "
                    f"(callbacks.nonfinite_guard.max_consecutive={self.max_consecutive}); lower "
                    "the learning rates or check the inputs; the last checkpoint is the last good one"
                )
        else:
            self.streak = 0
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict["skipped"])


#: Signals after which training saves a resumable checkpoint and exits: Ctrl-C, SIGTERM (schedulers,
#: ``kill``) and SIGUSR1, the pre-emption warning Lightning's SLURM plugin listens for.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's step checkpoints, made resumable at every exit.

    * the final step is always written (``last.ckpt`` and a ``step*.ckpt``), even when
      ``max_steps`` is not a multiple of ``every_n_train_steps``;
    * on SIGINT, SIGTERM or SIGUSR1 the step in progress finishes, ``last.ckpt`` is written and
      training stops with :class:`TrainingInterrupted` (a second signal of the same kind stops at
      once, without saving);
    * temporary files a killed writer left in the checkpoint directory are removed at the start.

    Takes :class:`~pytorch_lightning.callbacks.ModelCheckpoint`'s arguments.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._received: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._received is not None:  # second signal: the user does not want to wait
            signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self._received = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath is not None:
            for path in remove_stale_temporaries(self.dirpath):
                print(f"Removed a temporary file left by an interrupted write: {path}")
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        received = self._received if self._received is not None else 0
        if not trainer.strategy.reduce_boolean_decision(bool(received), all=False):
            return
        # Another rank may have received it: all ranks save together (rank 0 writes).
        signum = received or signal.SIGTERM
        self._save_final(trainer)
        self._restore_handlers()
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {trainer.global_step}; saved "
            f"{self.last_model_path}; resume with: python train.py ckpt_path={self.last_model_path}",
            signum,
        )

    def _save_final(self, trainer: pl.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return
        candidates = self._monitor_candidates(trainer)
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if trainer.global_step > 0:
            self._save_final(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)
