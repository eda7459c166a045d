"""No lost steps: the final step, SIGINT/SIGTERM/SIGUSR1 and SIGKILL, kills during checkpoint writes.

Each test runs ``train.py`` as a user would (a subprocess with the tiny settings of
``tests/conftest.py``), interrupts it, then resumes it with ``ckpt_path=`` alone (plus a training
length), as README documents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asd3d.io import RECIPE_KEY, atomic_torch_save, load_checkpoint, remove_stale_temporaries

from cli_helpers import run_entry, train
from conftest import REPO, SHARED_CORPORA, TINY

LONG = ["trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=2"]


def _start_training(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ASD3D_CORPORA_DIR": str(SHARED_CORPORA),
    }
    command = [sys.executable, str(REPO / "train.py"), *TINY, *LONG, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        [*command, *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


def _step(path: Path) -> int:
    return int(load_checkpoint(path)["global_step"])


def _resume(last: Path, steps: int) -> subprocess.CompletedProcess:
    # README's form: ckpt_path alone, plus a training length.
    return run_entry("train.py", f"ckpt_path={last}", f"trainer.max_steps={steps}")


def test_final_step_is_checkpointed(tmp_path):
    """max_steps not a multiple of every_n_train_steps: last.ckpt still holds the final step."""
    run_dir = tmp_path / "run"
    result = train(run_dir, "trainer.max_steps=5", "trainer.val_check_interval=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 5
    assert _step(run_dir / "checkpoints" / "step0000005.ckpt") == 5


def _interrupt_and_check(tmp_path, signum: int) -> tuple[Path, int]:
    run_dir = tmp_path / "run"
    process = _start_training(run_dir)
    _wait_for(run_dir / "checkpoints" / "step0000002.ckpt", process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    last_line = [line for line in stderr.splitlines() if line.strip()][-1]
    name = signal.Signals(signum).name
    assert last_line.startswith(f"interrupted: {name} at step "), last_line
    stopped_at = int(last_line.split(" at step ")[1].split(";")[0])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"python train.py ckpt_path={last}" in last_line
    assert _step(last) == stopped_at >= 2, "steps were lost"
    return last, stopped_at


def test_sigterm_saves_and_ckpt_path_alone_resumes(tmp_path):
    last, stopped_at = _interrupt_and_check(tmp_path, signal.SIGTERM)
    wandb_id = load_checkpoint(last)[RECIPE_KEY]["wandb_id"]
    result = _resume(last, stopped_at + 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Run directory: {last.parent.parent}" in result.stdout, "resumed in another directory"
    assert f"{stopped_at}/{stopped_at + 1}" in result.stderr, "did not continue at the saved step"
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == stopped_at + 1
    assert resumed[RECIPE_KEY]["wandb_id"] == wandb_id, "a resumed run must keep its W&B run"


@pytest.mark.parametrize(
    "signum",
    [pytest.param(signal.SIGINT), pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
    ids=["SIGINT", "SIGUSR1"],
)
def test_sigint_and_slurm_preemption_save_a_checkpoint(tmp_path, signum):
    _interrupt_and_check(tmp_path, signum)


def test_sigkill_then_resume_at_the_saved_step(tmp_path):
    run_dir = tmp_path / "run"
    process = _start_training(run_dir)
    _wait_for(run_dir / "checkpoints" / "step0000004.ckpt", process)
    process.kill()
    process.communicate()
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = _step(last)
    assert saved >= 2 and saved % 2 == 0  # last.ckpt may lag the step file by one save
    stale = run_dir / "checkpoints" / ".last.0123456789ab.tmp.ckpt"
    stale.write_bytes(b"")  # what a kill during a write leaves behind
    result = _resume(last, saved + 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{saved}/{saved + 2}" in result.stderr, "did not continue at the saved step"
    assert _step(last) == saved + 2
    assert not stale.exists(), "stale temporary checkpoint not removed at start"


_WRITER = """
import sys, torch
from asd3d.io import atomic_torch_save
path = sys.argv[1]
state = {"w": torch.arange(4_000_000, dtype=torch.float32)}
while True:
    atomic_torch_save(state, path)
"""


def test_kills_during_checkpoint_writes_never_corrupt_the_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.arange(4_000_000, dtype=torch.float32)}, target)
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".last.*.tmp.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)  # mid-write: a temporary file exists
        writer.wait()
        state = torch.load(target, weights_only=True)
        assert torch.equal(state["w"], torch.arange(4_000_000, dtype=torch.float32))
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
