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


def _sweep_defaults() -> tuple[str | None, str | None]:
    """Run name = this job's overrides; group = the sweep directory (a ``-m`` sweep groups)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None
    name = ",".join(hydra_cfg.overrides.task) or "default"
    group = (
        Path(hydra_cfg.sweep.dir).name
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
        else None
    )
    return name, group


def wandb_logger(
    project: str,
    save_dir: str,
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
) -> WandbLogger | None:
    """Build a :class:`WandbLogger`; ``mode=auto`` logs online only when logged in.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; upload them with ``wandb sync``.
    ``WANDB_MODE`` is set in the environment (not only passed), otherwise wandb's analytics
    thread still tries the network at exit (STACK.md).
    """
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.environ["WANDB_MODE"] = mode
    default_name, default_group = _sweep_defaults()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or default_name,
        group=group or default_group,
        tags=list(tags or []),
        offline=mode == "offline",
    )
    if mode == "offline":
        print(
            f"W&B is offline (not logged in); upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    return logger
