"""The prepared GPU check (asd3d.bench_gpu) runs end to end with tiny networks on the CPU, so the
script the next session with a device runs cannot rot; and bf16-mixed trains every recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asd3d.bench_gpu import DISTILLERS, RECIPES, main

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra: str) -> dict:
    args = ["--size=tiny", f"--out={tmp_path}", "--steps=1", "--warmup=0", "--variants=bf16"]
    assert main(args + list(extra)) == 0
    return json.loads((tmp_path / "bench_gpu.json").read_text())


def test_bench_gpu_tiny_times_every_recipe_in_bf16(tmp_path):
    # The command docs/performance.md gives, as written.
    command = "python -m asd3d.bench_gpu --size tiny --steps 1 --warmup 0 --variants bf16 --skip distillers"
    result = subprocess.run(
        [sys.executable, *command.split()[1:]],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    timing = report["sections"]["timing"]
    assert set(timing) == {f"{recipe}/bf16" for recipe in RECIPES}
    for result in timing.values():
        assert "error" not in result, result
        assert result["finite_loss"] and result["median_ms"] > 0 and result["x_floor"] > 0
    assert "| df415_3dconv_sd | bf16 |" in (tmp_path / "bench_gpu.md").read_text()


@pytest.mark.slow
def test_bench_gpu_tiny_trains_every_distiller_and_recipe_in_bf16(tmp_path):
    report = _run(tmp_path, "--skip=timing", "--distiller-steps=2")
    outcomes = report["sections"]["distillers"]
    assert set(outcomes) == {f"{r}/{d}" for r in RECIPES for d in DISTILLERS}
    assert set(outcomes.values()) == {"ok"}, outcomes
