"""W&B logger that works on a laptop, a cluster and CI: online when logged in, offline otherwise."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger

MODES = ("auto", "online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """True when an API key is available (env var or ``~/.netrc``), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


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


def wandb_logger(
    project: str,
    save_dir: str,
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    id: str | None = None,
) -> WandbLogger | None:
    """Build a :class:`WandbLogger`; ``mode=auto`` logs online only when logged in.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; upload them with ``wandb sync``.
    ``WANDB_MODE`` is set in the environment (not only passed), otherwise wandb's analytics
    thread still tries the network at exit (STACK.md). ``id``: the run's W&B id (``train.py``
    sets it; a resumed run passes its checkpoint's, and W&B continues that run).
    """
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.environ["WANDB_MODE"] = mode
    default_name, default_group, default_tags = hydra_run_identity()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or default_name,
        group=group or default_group,
        tags=list(dict.fromkeys([*default_tags, *(tags or [])])),
        offline=mode == "offline",
        id=id,
        resume="allow" if id else None,
    )
    if mode == "offline":
        print(
            f"W&B is offline (not logged in); upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    return logger
