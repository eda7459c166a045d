"""The grammar-wide miniature prior's recipe: fresh renders of the multi-modal world, a resume
file that continues a stopped run exactly, and the evaluation of its targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict
from test_miniature import compose_prior

from asd3d.io import load_checkpoint
from asd3d.miniature.training import run_prior_training

from cli_helpers import run_entry
from conftest import REPO

# The grammar recipe at 8² with a UNet of a few thousand parameters: seconds per run.
TINY_GRAMMAR = [
    "corpus.num_prompts=50",
    "corpus.num_test_prompts=2",
    "data.resolution=8",
    "data.stream.chunk_size=4",
    "data.stream.buffer_chunks=2",
    "data.stream.refresh_every_n_steps=1",
    "ground_truth.num_samples_stratified=8",
    "ground_truth.num_samples_importance=4",
    "unet.block_out_channels=[8,8,16]",
    "unet.norm_num_groups=4",
    "unet.cross_attention_dim=16",
    "unet.attention_head_dim=2",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.log_every_n_steps=1",
    "train.checkpoint_every_n_steps=1",
    "evaluation.num_cameras=1",
    "evaluation.num_inference_steps=2",
    "evaluation.error_curve_points=0",
    "evaluation.attribute_changes=2",
    "evaluation.mode_seeds=2",
    "evaluation.mode_prompts=1",
]


def compose_grammar(overrides: list[str], output_dir: Path) -> DictConfig:
    cfg = compose_prior(overrides, output_dir, config_name="train_prior_grammar")
    with open_dict(cfg):
        cfg.resume_file = str(output_dir.parent / "resume.pt")
    return cfg


def _log_steps(path: Path) -> list[int]:
    with open(path, newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[DictConfig, dict]:
    cfg = compose_grammar(TINY_GRAMMAR, tmp_path_factory.mktemp("straight") / "run")
    return cfg, run_prior_training(cfg)


def test_a_stopped_run_resumed_from_its_file_equals_the_uninterrupted_run(straight, tmp_path):
    cfg, _ = straight
    stopped = compose_grammar([*TINY_GRAMMAR, "stop_at_step=2"], tmp_path / "first")
    assert run_prior_training(stopped) == {"stopped_at_step": 2}
    state = load_checkpoint(stopped.resume_file)
    assert state["step"] == 2 and [int(r["step"]) for r in state["log"]] == [1, 2]
    # A new process on a "new machine": nothing but the resume file and the same command.
    resumed = compose_grammar(TINY_GRAMMAR, tmp_path / "second")
    with open_dict(resumed):
        resumed.resume_file = stopped.resume_file
    run_prior_training(resumed)
    ours = load_checkpoint(resumed.resume_file)
    theirs = load_checkpoint(cfg.resume_file)
    assert ours["step"] == theirs["step"] == 4
    for name, value in theirs["unet"].items():
        assert torch.equal(ours["unet"][name], value), name
    assert _log_steps(Path(stopped.resume_file).parent / "train_log.csv") == [1, 2, 3, 4]


def test_resume_refuses_a_file_of_another_run(straight, tmp_path):
    cfg, _ = straight
    other = compose_grammar([*TINY_GRAMMAR, "unet.block_out_channels=[8,16,16]"], tmp_path / "o")
    with open_dict(other):
        other.resume_file = cfg.resume_file
    with pytest.raises(ValueError, match="other unet settings"):
        run_prior_training(other)


def test_evaluation_reports_the_targets(straight):
    cfg, result = straight
    assert result["num_samples"] == 2
    assert 0.0 <= result["attribute_change_r1"] <= 1.0 and result["attribute_changes"] == 2
    coverage = result["mode_coverage"]
    assert coverage["num_variants"] == 3 and coverage["num_seeds"] == 2
    assert 0.0 <= coverage["mean_scenes_hit"] <= 2
    export = Path(cfg.export_dir)
    assert (export / "modes.png").is_file()
    assert json.loads((export / "evaluation.json").read_text())["mode_coverage"] == coverage


def test_evaluate_only_measures_a_resume_file(straight, tmp_path):
    cfg, _ = straight
    run = tmp_path / "measure"
    result = run_entry(
        "train_prior.py",
        "--config-name",
        "train_prior_grammar",
        *TINY_GRAMMAR,
        f"evaluate_only={cfg.resume_file}",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "miniature" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    measured = json.loads((run / "evaluation.json").read_text())
    assert measured["num_samples"] == 2 and "attribute_change_r1" in measured


@pytest.mark.slow
def test_the_documented_measurement_of_the_committed_resume_file(tmp_path):
    """docs/miniature-prior.md's command on the committed run state (two held-out prompts)."""
    resume = REPO / "weights" / "miniature_grammar" / "resume.pt"
    if not resume.is_file():
        pytest.skip("no committed resume file")
    run = tmp_path / "measure"
    result = run_entry(
        "train_prior.py",
        "--config-name",
        "train_prior_grammar",
        "evaluate_only=weights/miniature_grammar/resume.pt",
        "corpus.num_test_prompts=2",
        "evaluation.mode_prompts=1",
        f"hydra.run.dir={run}",
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads((run / "evaluation.json").read_text())
    assert measured["num_samples"] == 8 and measured["attribute_changes"] == 8
    assert measured["mode_coverage"]["num_seeds"] == 8
