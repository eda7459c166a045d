"""Validation during training feeds the dashboards: CLIP metrics, a per-prompt table, videos.

The W&B run is offline (no account, no network); its media files are what an upload would show.
"""

import csv
import sys
from pathlib import Path

import pytest

from asd3d.evaluation.live import LiveValidation

from cli_helpers import train

sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
from tiny_clip import save_tiny_clip  # noqa: E402


def test_a_wandb_offline_run_has_metrics_table_images_and_videos(tmp_path):
    config, weights = save_tiny_clip(tmp_path / "clip")
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "logger=default",
        "logger.wandb.mode=offline",
        "system.image_every_n_steps=3",
        f"system.live_validation.clip_model={config}",
        f"system.live_validation.clip_pretrained={weights}",
        "system.live_validation.video_prompts=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"val/oracle_r1", "val/clip_r1", "val/clip_sim"} <= logged
    clip_r1 = [float(r["val/clip_r1"]) for r in rows if r.get("val/clip_r1")]
    assert all(0.0 <= v <= 1.0 for v in clip_r1)

    videos = sorted((run_dir / "videos").glob("val_*.mp4"))
    assert [v.name[:8] for v in videos] == ["val_0000", "val_0001"]

    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    media = offline_run / "files" / "media"
    assert list((media / "videos").rglob("*.mp4")), "no video in the W&B run"
    assert list((media / "images").rglob("*.png")), "no image grid in the W&B run"
    (table,) = list((media / "table").rglob("*.table.json"))
    assert "clip_r1" in table.read_text() and "oracle_r1" in table.read_text()


def test_negative_video_count_is_refused():
    with pytest.raises(ValueError, match="video_prompts=-1"):
        LiveValidation(video_prompts=-1)
