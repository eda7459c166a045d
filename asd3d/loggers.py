"""W&B that works on a laptop, a cluster and CI: online when logged in, offline otherwise.

* One W&B run per Hydra job: a ``-m`` sweep runs its jobs in one process, so every run is
  finished when its job's training ends (:class:`JobWandbLogger`); the jobs of one sweep share a
  group (:func:`hydra_run_identity`).
* The user's environment wins over the defaults and is never rewritten: ``WANDB_MODE``,
  ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_NAME``, ``WANDB_TAGS`` and
  ``WANDB_DIR`` (conf/logger/default.yaml reads them); a value on the command line wins over both.
* ``evaluate.py`` logs into the training run it evaluates (:func:`run_id_of`).
"""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

MODES = ("auto", "online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True when an API key is available (env var or ``~/.netrc``), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """The W&B mode a run uses: ``auto`` is the user's ``WANDB_MODE`` when set, else online when
    logged in, else offline; any other value is used as given."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    from_env = os.environ.get("WANDB_MODE")
    if from_env:
        return "offline" if from_env == "dryrun" else from_env
    return "online" if wandb_logged_in() else "offline"


# Config groups whose chosen option becomes a W&B tag (``generator:3dconv``, ``distiller:asd``...).
TAGGED_GROUPS = ("experiment", "corpus", "generator", "renderer", "prior", "distiller")


def hydra_run_identity() -> tuple[str | None, str | None, list[str]]:
    """Name, group and tags of this Hydra job, for dashboards that group and filter runs.

    * name: the job's command-line overrides (``distiller.eta=0.2``), or ``default``;
    * group: in a ``-m`` sweep, ``<experiment or task>/<sweep dir>`` so every job of one sweep
      lands in one W&B group; ``None`` for a single run;
    * tags: ``group:option`` for the chosen option of each group in :data:`TAGGED_GROUPS`.

    Outside a Hydra app (tests, notebooks) all three are empty.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None, []
    name = ",".join(hydra_cfg.overrides.task) or "default"
    choices = dict(hydra_cfg.runtime.choices)
    tags = [f"{g}:{choices[g]}" for g in TAGGED_GROUPS if choices.get(g) not in (None, "null")]
    group = None
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        label = choices.get("experiment") or hydra_cfg.job.name
        label = hydra_cfg.job.name if label in (None, "null") else label
        group = f"{label}/{Path(hydra_cfg.sweep.dir).name}"
    return name, group, tags


class JobWandbLogger(WandbLogger):
    """Lightning's :class:`WandbLogger` whose run ends with its job (``wandb.finish()``).

    Without it the second job of a ``-m`` sweep (same process) would find the first job's run
    still open and log into it.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def wandb_logger(
    project: str,
    save_dir: str,
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    entity: str | None = None,
    run_dir: str | None = None,
    run_id: str | None = None,
) -> JobWandbLogger | None:
    """Build the W&B logger of one job; ``None`` when W&B is disabled.

    ``mode``: see :func:`resolve_mode`. Offline runs land in ``<save_dir>/wandb/offline-run-*``;
    upload them with ``wandb sync``. The run's id is ``run_id`` when given (``WANDB_RUN_ID``), else
    :func:`run_id_of` ``run_dir``, else a fresh one.
    ``WANDB_MODE`` is put in the environment when the user has not set it, otherwise wandb's
    analytics thread still tries the network at exit in offline mode.
    """
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_MODE", mode)
    default_name, default_group, default_tags = hydra_run_identity()
    env_tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = JobWandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or default_name,
        group=group or default_group,
        tags=list(dict.fromkeys([*default_tags, *(tags or []), *env_tags])),
        entity=entity,
        id=run_id or (run_id_of(run_dir) if run_dir is not None else None),
        mode=mode,  # passed to wandb.init; Lightning's own `offline=True` would rewrite WANDB_MODE
    )
    if mode == "offline":
        print(f"W&B is offline; upload later with: wandb sync {save_dir}/wandb/offline-run-*")
    return logger


class LearningRateLogger(LearningRateMonitor):
    """Lightning's :class:`LearningRateMonitor` (``lr-<optimizer>/<param group>`` every logged
    step: the rates decay with ``system.lr_final_ratio``), idle when the run has no logger
    (``logger=none``) instead of failing."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def run_id_of(run_dir: str | os.PathLike[str]) -> str:
    """The W&B run id of a run directory: a hash of its absolute path.

    Training and every later ``evaluate.py`` of the same run directory (also a resumed run that
    continues in it) therefore log into one W&B run, found from the config stored in the
    checkpoint, and a new run directory (a new job) always starts a new run.
    """
    return hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]


def log_evaluation(
    run_cfg: Any,
    means: dict[str, float],
    columns: list[str],
    rows: list[list[Any]],
    turntables: list[Path],
) -> bool:
    """Log ``evaluate.py``'s results into the W&B run of the training run: the mean metrics as
    ``eval/<name>`` (also in the run summary), ``eval/prompts`` (a table of ``rows``, whose first
    two columns are the prompt's index and text) and each prompt's ``eval/turntable_<index>``. ``run_cfg`` is the training run's config (its ``logger.wandb``).
    Returns False (nothing logged) when that run had no W&B logger or W&B is disabled."""
    settings = (run_cfg.get("logger") or {}).get("wandb")
    if settings is None:
        return False
    logger = wandb_logger(
        project=settings.project,
        save_dir=settings.save_dir,
        mode=settings.mode,
        entity=settings.get("entity"),
        run_dir=settings.get("run_dir"),
        run_id=settings.get("run_id"),
    )
    if logger is None:
        return False
    metrics = {f"eval/{name}": value for name, value in means.items()}
    logger.log_metrics(metrics)
    logger.experiment.summary.update(metrics)
    logger.log_table(key="eval/prompts", columns=columns, data=rows)
    for row, path in zip(rows, turntables):  # the H.264 files as they are, as validation logs them
        logger.log_video(key=f"eval/turntable_{row[0]:05d}", videos=[str(path)], caption=[row[1]])
    logger.finalize("success")
    return True
