"""What the entry points share: user-facing errors, DDP-inside-multirun, checks before a run,
the machine's defaults."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asd3d.io import CheckpointError

_DDP_ARGV_ENV = "ASD3D_DDP_JOB_ARGV"

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    CheckpointError,
    HydraException,
    OmegaConfBaseException,
)


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The innermost meaningful message of an error, on one line."""
    error = _root_cause(error)
    message = " ".join(str(error).split()) or type(error).__name__
    return message


@contextlib.contextmanager
def user_errors(output_dir: Path | None = None) -> Iterator[None]:
    """Turn bad-input errors into ``error: <one line>`` and exit 1 (``ASD3D_DEBUG=1``: traceback).

    If ``output_dir`` is given and holds no checkpoint yet, it is removed so that a failed
    start leaves nothing half-written behind.
    """
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("ASD3D_DEBUG"):
            traceback.print_exc()
        if output_dir is not None and output_dir.exists() and not any(output_dir.rglob("*.ckpt")):
            shutil.rmtree(output_dir, ignore_errors=True)
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None


def restore_ddp_job_argv() -> None:
    """In a DDP child process, replace a multirun command line by the parent's job.

    Lightning's DDP launcher re-runs ``sys.argv``; inside ``python train.py -m ...`` that would
    make rank 1 run the whole sweep (STACK.md). The parent stores its own job's command line in
    the environment (:func:`remember_ddp_job_argv`) and children take it here.
    """
    stored = os.environ.get(_DDP_ARGV_ENV)
    if stored and os.environ.get("LOCAL_RANK", "0") != "0":
        sys.argv = [sys.argv[0], *json.loads(stored)]


def remember_ddp_job_argv(local_rank_suffix: str = "ddp") -> None:
    """Store this Hydra job's overrides for the DDP children (multirun only)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is None or hydra_cfg.mode.name != "MULTIRUN":
        return
    argv = [
        *hydra_cfg.overrides.task,
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_{local_rank_suffix}",
    ]
    os.environ[_DDP_ARGV_ENV] = json.dumps(argv)


def check_writable_directory(key: str, directory: Path) -> None:
    """``directory`` exists and is writable, or can be created: else one line naming ``key``.

    Probes with a real file (permission bits say nothing for root or read-only mounts).
    """
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(
            f"{key}={directory}: allowed a writable directory ({existing}: {reason})"
        ) from None


class PreflightCallback(Callback):
    """Hydra callback: check a run before Hydra creates its directory.

    The output directory must be writable and, with ``validate_train=True``, every value must
    pass :func:`asd3d.schema.validate_train_config`. A failure prints one line and exits 1 with
    nothing created (``train.py`` checks again in each job of a ``-m`` sweep).
    """

    def __init__(self, validate_train: bool = False) -> None:
        self.validate_train = validate_train

    def _check(self, config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # ${hydra:...} resolves as in the job
        with user_errors():
            check_writable_directory(key, Path(str(OmegaConf.select(config, key))))
            if self.validate_train:
                from asd3d.schema import validate_train_config

                validate_train_config(config)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        with user_errors():
            check_writable_directory(
                "hydra.sweep.dir", Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
            )


#: What ``python train.py`` trains on a machine without CUDA unless the command sizes the run.
CPU_EXPERIMENT = "quickstart"

#: The config groups of ``train.py`` (``conf/<group>/``; ``hydra`` for ``hydra/launcher=``).
TRAIN_GROUPS = frozenset(
    p.name for p in (Path(__file__).resolve().parents[1] / "conf").iterdir() if p.is_dir()
)
#: Groups whose choice keeps the CPU preset: they change the method, not the size of the run.
SIZE_NEUTRAL_GROUPS = frozenset(
    {"distiller", "optimizer", "system", "logger", "callbacks", "paths"}
)


def machine_defaults(argv: list[str], cuda: bool) -> list[str]:
    """The command line ``train.py`` runs: on a machine without CUDA, a command that chooses no
    experiment and no group that sizes the run (generator, prior, corpus, renderer, cameras,
    trainer, a Hydra launcher) -- ``python train.py``, ``python train.py -m distiller.eta=0,0.1``,
    ``python train.py distiller=vsd`` -- trains on top of ``experiment=quickstart`` (sized for a
    CPU) and says so on stderr.

    The group defaults of ``conf/train.yaml`` stay the paper's settings: they are what a CUDA
    machine runs, and what any command that sizes the run builds on, wherever it runs. A resume
    (``ckpt_path=``) keeps the configuration stored in its checkpoint.
    """
    keys = {arg.split("=", 1)[0].lstrip("+~").split("/")[0] for arg in argv if "=" in arg}
    if cuda or "ckpt_path" in keys or (keys & TRAIN_GROUPS) - SIZE_NEUTRAL_GROUPS:
        return argv
    print(
        f"No CUDA device: training experiment={CPU_EXPERIMENT}, the procedural world sized for a "
        "CPU (~15 min), with your overrides; experiment=null for the paper's GPU defaults.",
        file=sys.stderr,
    )
    return [*argv, f"experiment={CPU_EXPERIMENT}"]
