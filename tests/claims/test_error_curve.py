"""``python -m asd3d.claims.error_curve``: e(t) of a prior and of its LoRA fine-tuned copy."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from claims_helpers import TINY_CLAIM, TINY_PROCEDURAL, compose_claim, train_tiny_miniature_prior

from asd3d.claims.error_curve import run_error_curve
from asd3d.cli import one_line

from conftest import REPO

SMALL = [
    *TINY_CLAIM,
    "images.views_per_prompt=2",
    "fine_tune.images.views_per_prompt=4",
    "fine_tune.batch_size=4",
    "measure.num_points=5",
    "measure.num_noise=1",
]
COLUMNS = [
    "t",
    "prior_conditional",
    "prior_unconditional",
    "lora_conditional",
    "lora_unconditional",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_procedural_prior_and_its_fine_tuned_copy(tmp_path):
    cfg = compose_claim("error_curve", [*SMALL, *TINY_PROCEDURAL, "fine_tune.steps=15"], tmp_path)
    curves = run_error_curve(cfg)
    rows = read_rows(tmp_path / "error_curve.csv")
    assert list(rows[0]) == COLUMNS
    assert [int(row["t"]) for row in rows] == [20, 260, 500, 740, 980]
    assert all(float(row[c]) >= 0 for row in rows for c in COLUMNS[1:])
    # The exact denoiser's conditional error falls with t (Fig. 2's shape, trivially here).
    assert float(rows[-1]["prior_conditional"]) < float(rows[0]["prior_conditional"])
    # The residual eps-net changed the prediction: the copy's curve is not the prior's.
    assert not torch.allclose(curves["lora_conditional"], curves["prior_conditional"])
    assert len(read_rows(tmp_path / "fine_tune_loss.csv")) == 15
    assert (tmp_path / "error_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    assert "prior=procedural" in summary and "ResidualParticle" in summary
    assert "| prior_conditional |" in summary and "| lora_unconditional |" in summary


def test_without_fine_tuning_only_the_prior_is_measured(tmp_path):
    cfg = compose_claim("error_curve", [*SMALL, *TINY_PROCEDURAL, "fine_tune.steps=0"], tmp_path)
    run_error_curve(cfg)
    assert list(read_rows(tmp_path / "error_curve.csv")[0]) == COLUMNS[:3]
    assert "No LoRA copy" in (tmp_path / "summary.md").read_text()


def test_miniature_lora_copy_differs_and_leaves_the_prior_unchanged(tmp_path):
    pretrained = train_tiny_miniature_prior(tmp_path / "prior" / "run")
    overrides = [*SMALL, "prior=miniature", f"prior.pretrained={pretrained}"]
    untouched = run_error_curve(
        compose_claim("error_curve", [*overrides, "fine_tune.steps=0"], tmp_path / "before")
    )
    cfg = compose_claim(
        "error_curve", [*overrides, "fine_tune.steps=20", "lora.lr=1e-2"], tmp_path / "after"
    )
    curves = run_error_curve(cfg)
    # The LoRA only acts on its own rows: the prior's curve is the same as without the copy.
    for name in ("prior_conditional", "prior_unconditional"):
        assert torch.allclose(curves[name], untouched[name])
    assert not torch.allclose(curves["lora_conditional"], curves["prior_conditional"])
    assert "LoRAParticle" in (tmp_path / "after" / "summary.md").read_text()


def test_bad_options_give_one_line_errors(tmp_path):
    cfg = compose_claim(
        "error_curve", [*SMALL, *TINY_PROCEDURAL, "measure.t_range=[20,1000]"], tmp_path
    )
    with pytest.raises(ValueError) as raised:
        run_error_curve(cfg)
    assert "measure.t_range=[20, 1000]" in one_line(raised.value)
    cfg = compose_claim(
        "error_curve", [*SMALL, *TINY_PROCEDURAL, "images.views_per_prompt=0"], tmp_path
    )
    with pytest.raises(ValueError, match="views_per_prompt=0"):
        run_error_curve(cfg)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asd3d.claims.error_curve",
            *SMALL,
            "device=tpu",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: device='tpu' is not one of auto, cpu, cuda, cuda:<index>"
    )


def test_logs_to_wandb_offline(tmp_path):
    cfg = compose_claim(
        "error_curve",
        [
            *SMALL,
            *TINY_PROCEDURAL,
            "fine_tune.steps=2",
            "logger=wandb",
            "logger.wandb.mode=offline",
        ],
        tmp_path,
    )
    run_error_curve(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    metrics = read_rows(tmp_path / "csv" / "metrics.csv")
    assert float(metrics[0]["error_curve/prior_conditional/t20"]) > 0
