"""Resident memory does not grow with corpus size (100 vs 100,000 procedural prompts)."""

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import pytorch_lightning as pl
from conftest import compose_train, TINY
from asd3d.build import build_system
cfg = compose_train([*TINY, "corpus.num_prompts={n}", "trainer.max_steps=8"], Path({out!r}))
system = build_system(cfg, {{}})
trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     accelerator="cpu", use_distributed_sampler=False)
trainer.fit(system)
print(json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def peak_rss_mb(num_prompts: int, tmp_path) -> float:
    code = SCRIPT.format(
        tests=str(REPO / "tests"), n=num_prompts, out=str(tmp_path / f"run{num_prompts}")
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024


def test_resident_memory_independent_of_corpus_size(tmp_path):
    small, large = peak_rss_mb(100, tmp_path), peak_rss_mb(100_000, tmp_path)
    assert large - small < 100, f"100k prompts: {large:.0f} MB vs 100 prompts: {small:.0f} MB"
