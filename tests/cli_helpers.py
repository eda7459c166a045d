"""Run the entry points as a user would (subprocesses), with the tiny settings of conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SHARED_CORPORA, TINY


def run_entry(
    script: str, *args: str, timeout: int = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ASD3D_CORPORA_DIR": str(SHARED_CORPORA),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run_entry("train.py", *TINY, f"hydra.run.dir={run_dir}", *overrides, **kwargs)
