"""``python -m asd3d.claims.gradient_norms``: SDS / CSD / VSD / ASD update norms on the same renders."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from claims_helpers import TINY_CLAIM, TINY_PROCEDURAL, compose_claim, train_tiny_miniature_prior

from asd3d.claims.gradient_norms import run_gradient_norms

from conftest import REPO

SMALL = [
    *TINY_CLAIM,
    "images.views_per_prompt=2",
    "vsd_particle.steps=5",
    "vsd_particle.batch_size=4",
    "num_draws=6",
    "draws_per_call=3",
]
IMAGES = 3 * 2  # prompts x views


def median(values: torch.Tensor) -> float:
    return torch.quantile(values.flatten().double(), 0.5).item()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_procedural_prior_sds_at_cfg_100_exceeds_asd(tmp_path):
    norms = run_gradient_norms(
        compose_claim("gradient_norms", [*SMALL, *TINY_PROCEDURAL], tmp_path)
    )
    rows = read_rows(tmp_path / "gradient_norms.csv")
    assert list(rows[0]) == ["method", "draw", "image", "t", "norm"]
    assert len(rows) == 4 * 6 * IMAGES
    assert [r["method"] for r in rows[:: 6 * IMAGES]] == ["sds", "csd", "vsd", "asd"]
    # Every method saw the same timesteps, draw by draw.
    by_method: dict[str, list[int]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(int(row["t"]))
    assert by_method["sds"] == by_method["asd"] == by_method["vsd"] == by_method["csd"]
    assert all(20 <= t <= 980 for t in by_method["sds"])
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in norms.values())
    assert norms["sds"].median() > 3 * norms["asd"].median()
    summary = (tmp_path / "summary.md").read_text()
    ratio = median(norms["sds"]) / median(norms["asd"])
    assert f"Median ratio sds / asd: {ratio:.3g}" in summary
    assert (tmp_path / "gradient_norms.png").read_bytes()[:4] == b"\x89PNG"


def test_asd_without_shift_at_cfg_1_has_no_update(tmp_path):
    """eta = 0 and CFG 1: both branches are the conditional prediction on the same x_t."""
    cfg = compose_claim(
        "gradient_norms",
        [
            *SMALL,
            *TINY_PROCEDURAL,
            "include=[sds,asd]",
            "methods.asd.eta=0",
            "methods.asd.guidance_scale=1",
            "num_draws=2",
        ],
        tmp_path,
    )
    norms = run_gradient_norms(cfg)
    assert set(norms) == {"sds", "asd"}
    assert torch.all(norms["asd"] == 0) and torch.all(norms["sds"] > 0)


def test_miniature_prior_all_four_methods(tmp_path):
    pretrained = train_tiny_miniature_prior(tmp_path / "prior" / "run")
    cfg = compose_claim(
        "gradient_norms",
        [*SMALL, "prior=miniature", f"prior.pretrained={pretrained}", "ratio=[sds,csd]"],
        tmp_path / "claim",
    )
    norms = run_gradient_norms(cfg)
    assert {name: v.shape for name, v in norms.items()} == {
        name: (6, IMAGES) for name in ("sds", "csd", "vsd", "asd")
    }
    # SDS at CFG 100 is (w(t) times) 100 x the CSD direction plus the unconditional residual.
    assert norms["sds"].median() > 10 * norms["csd"].median()
    summary = (tmp_path / "claim" / "summary.md").read_text()
    assert "prior=miniature" in summary and "LoRAParticle" in summary
    assert "Median ratio sds / csd" in summary


def test_bad_options_give_one_line_errors(tmp_path):
    cfg = compose_claim("gradient_norms", [*SMALL, *TINY_PROCEDURAL, "include=[sds,foo]"], tmp_path)
    with pytest.raises(ValueError, match=r"include=\['sds', 'foo'\]: \['foo'\] not among"):
        run_gradient_norms(cfg)
    cfg = compose_claim("gradient_norms", [*SMALL, *TINY_PROCEDURAL, "t_range=[500,20]"], tmp_path)
    with pytest.raises(ValueError, match=r"t_range=\[500, 20\]"):
        run_gradient_norms(cfg)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asd3d.claims.gradient_norms",
            *SMALL,
            "ratio=[sds]",
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
        "error: ratio=['sds'] must name two included methods, e.g. [sds, asd]"
    )
