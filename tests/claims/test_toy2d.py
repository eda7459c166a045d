"""The 2D toy (``python -m asd3d.claims.toy2d``): one image distilled by each method, directly.

On the exact procedural prior the ground truth is known, so the tests check that distillation
moves the image toward it (PSNR rises), not just that the command runs.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from asd3d.claims.toy2d import run_toy2d, snapshot_steps
from asd3d.miniature.training import run_prior_training

from conftest import CONF, REPO

# A 16² image and a coarse ground truth: ~0.05 s per method step on one core.
TINY_TOY = [
    "corpus.num_prompts=4",
    "corpus.num_test_prompts=4",
    "prior.mixture_size=4",
    "image.resolution=16",
    "ground_truth.num_samples_stratified=16",
    "ground_truth.num_samples_importance=8",
    "progress_snapshots=3",
]

# A 3-prompt miniature prior at 8² with a UNet of a few thousand parameters, trained 2 steps
# (as tests/prior/test_miniature.py does): exercises the learned-prior path and VSD's LoRA.
TINY_MINIATURE = [
    "corpus.num_prompts=3",
    "corpus.num_test_prompts=3",
    "data.resolution=8",
    "data.views_per_prompt=2",
    "ground_truth.num_samples_stratified=8",
    "ground_truth.num_samples_importance=4",
    "unet.block_out_channels=[8,8,16]",
    "unet.norm_num_groups=4",
    "unet.cross_attention_dim=16",
    "unet.attention_head_dim=2",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "evaluation.num_cameras=1",
    "evaluation.num_inference_steps=1",
    "evaluation.error_curve_points=0",
]


def _compose(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def procedural_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d") / "run"
    overrides = [*TINY_TOY, "steps=40", "log_every_n_steps=10", "lr=0.1", "logger=csv"]
    return run_toy2d(_compose("claims/toy2d", overrides, out), out)


def test_sds_and_asd_move_the_image_toward_the_ground_truth(procedural_run):
    rows = _rows(procedural_run.output_dir / "toy2d.csv")
    for method in ("sds", "asd"):
        psnr = [float(r["psnr"]) for r in rows if r["method"] == method]
        assert psnr[-1] > psnr[0] + 5.0, (method, psnr)
        assert procedural_run.final_psnr[method] == pytest.approx(psnr[-1])


def test_outputs_have_one_row_per_method_and_logged_step(procedural_run):
    out = procedural_run.output_dir
    rows = _rows(out / "toy2d.csv")
    assert [(r["method"], int(r["step"])) for r in rows] == [
        (m, s) for m in ("sds", "csd", "vsd", "asd") for s in (0, 10, 20, 30, 40)
    ]
    vsd = [r for r in rows if r["method"] == "vsd" and int(r["step"]) > 0]
    assert all(float(r["aux_loss"]) > 0 for r in vsd)  # its epsilon-net trained alongside
    asd = [r for r in rows if r["method"] == "asd" and int(r["step"]) > 0]
    assert all(float(r["dt"]) >= 0 for r in asd)
    # One row: ground truth + 4 methods; progress: 4 rows x 3 snapshots; cells >= 96 px.
    final = iio.imread(out / "toy2d.png")
    progress = iio.imread(out / "toy2d_progress.png")
    assert final.shape[1] >= 5 * 96 and final.shape[0] < 2 * 96
    assert progress.shape[1] >= 3 * 96 and progress.shape[0] >= 4 * 96
    summary = (out / "summary.md").read_text()
    for method in ("SDS", "CSD", "VSD", "ASD"):
        line = next(line for line in summary.splitlines() if line.startswith(f"| {method} |"))
        assert f"{procedural_run.final_psnr[method.lower()]:.2f}" in line
    assert "CFG 100" in summary and "eta 0.1" in summary


def test_curves_go_to_the_configured_logger(procedural_run):
    logged = _rows(procedural_run.output_dir / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in logged] == [0, 10, 20, 30, 40]
    last = logged[-1]
    for method in ("sds", "csd", "vsd", "asd"):
        assert float(last[f"toy2d/{method}/psnr"]) == pytest.approx(
            procedural_run.final_psnr[method], abs=1e-4
        )


def test_snapshot_steps_span_the_run():
    assert snapshot_steps(40, 3) == [0, 20, 40]
    assert snapshot_steps(2, 6) == [0, 1, 2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run_methods=[sds,dds]", "unknown method 'dds'"),
        ("prompt.index=99", "prompt.index=99 is outside"),
        ("image.init=zeros", "image.init='zeros'"),
    ],
)
def test_bad_input_is_a_clear_value_error(tmp_path, override, message):
    cfg = _compose("claims/toy2d", [*TINY_TOY, "steps=1", override], tmp_path / "run")
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        run_toy2d(cfg, tmp_path / "run")


def test_command_line_reports_bad_method_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "asd3d.claims.toy2d", "run_methods=[sdss]"]
        + [f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: run_methods has unknown method 'sdss'"), result.stderr
    assert "Traceback" not in result.stderr


def test_miniature_prior_runs_every_method_with_psnr(tmp_path):
    prior_cfg = _compose("train_prior", TINY_MINIATURE, tmp_path / "prior" / "run")
    run_prior_training(prior_cfg)
    export = Path(prior_cfg.export_dir)
    out = tmp_path / "toy"
    cfg = _compose(
        "claims/toy2d",
        [
            "prior=miniature",
            f"prior.pretrained={export}",
            "corpus.num_prompts=3",
            "corpus.num_test_prompts=3",
            "image.resolution=8",
            "ground_truth.num_samples_stratified=8",
            "ground_truth.num_samples_importance=4",
            "steps=3",
            "log_every_n_steps=1",
            "progress_snapshots=2",
        ],
        out,
    )
    result = run_toy2d(cfg, out)
    rows = _rows(out / "toy2d.csv")
    assert len(rows) == 4 * 4
    assert all(0.0 < value < 100.0 for value in result.final_psnr.values())
    vsd = [r for r in rows if r["method"] == "vsd" and int(r["step"]) > 0]
    assert all(float(r["aux_loss"]) > 0 for r in vsd)  # the LoRA's noise-prediction loss
