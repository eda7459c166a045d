"""W&B as a sweep uses it, read back from the offline run files: one run per job, grouped per
sweep, finished; learning rates logged; evaluate.py's results in the training run; the user's
WANDB_* environment respected."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from asd3d.loggers import resolve_mode, run_id_of, wandb_logger

from cli_helpers import run_entry
from conftest import TINY, compose_train

LEVELDB_HEADER, LEVELDB_BLOCK = 7, 32768  # W&B's transaction log: a LevelDB log of protobufs
FULL, LAST = 1, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of an offline ``run-<id>.wandb`` file (W&B writes them as a LevelDB log)."""
    data, pos, chunk = path.read_bytes(), LEVELDB_HEADER, b""
    while pos + 7 <= len(data):
        room = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or kind == 0:  # block trailer / padding
            pos += room
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def run_files(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))


def history(path: Path) -> list[dict[str, object]]:
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
            )
    return rows


def the_run(path: Path) -> wandb_internal_pb2.RunRecord:
    runs = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1
    return runs[0]


def finished(path: Path) -> bool:
    return any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 2-job sweep with W&B offline, 4 steps per job, every step logged."""
    sweep_dir = tmp_path_factory.mktemp("wandb") / "2026-12-04_12-00-00"
    result = run_entry(
        "train.py",
        "-m",
        *TINY,
        "logger=default",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "system.lr_final_ratio=0.1",
        "distiller.guidance_scale=5,7.5",
        f"hydra.sweep.dir={sweep_dir}",
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_every_job_of_a_sweep_has_its_own_finished_run_in_one_group(sweep):
    jobs = [sweep / "0", sweep / "1"]
    files = [run_files(job) for job in jobs]
    assert [len(f) for f in files] == [1, 1], files
    runs = [the_run(f[0]) for f in files]
    assert [r.run_id for r in runs] == [run_id_of(job) for job in jobs]
    assert runs[0].run_id != runs[1].run_id
    assert {r.run_group for r in runs} == {f"quickstart_exact/{sweep.name}"}
    assert [r.display_name.split(",")[-1] for r in runs] == [
        "distiller.guidance_scale=5",
        "distiller.guidance_scale=7.5",
    ]
    assert all(finished(f[0]) for f in files)
    # Each job's config is its own (not the first job's, overwritten).
    scales = []
    for f in files:
        config = [r.config for r in wandb_records(f[0]) if r.WhichOneof("record_type") == "config"]
        items = {i.key: i.value_json for c in config for i in c.update}
        scales.append(json.loads(items["distiller"])["guidance_scale"])
    assert scales == [5, 7.5]


def test_learning_rates_are_logged_and_decay(sweep):
    rates = [
        float(row["lr-Adam/generator"])
        for row in history(run_files(sweep / "0")[0])
        if "lr-Adam/generator" in row
    ]
    assert len(rates) >= 3, rates
    assert rates[0] == pytest.approx(2e-3)  # the quickstart world's rate, decaying to 10%
    assert all(b < a for a, b in zip(rates, rates[1:])), rates


def test_evaluation_is_logged_into_the_training_run(sweep, tmp_path):
    job = sweep / "1"
    result = run_entry(
        "evaluate.py",
        f"ckpt={job / 'checkpoints' / 'last.ckpt'}",
        "num_views=4",
        "view_chunk=4",
        "gallery.enabled=false",
        f"hydra.run.dir={tmp_path / 'evaluate'}",
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("oracle_r1=")
    files = run_files(job)
    assert len(files) == 2  # the training run and its continuation, one id
    evaluation = files[-1]  # offline-run-<time>-<id>: the later one
    assert {the_run(f).run_id for f in files} == {run_id_of(job)}
    rows = history(evaluation)
    logged = {key for row in rows for key in row}
    assert {"eval/oracle_r1", "eval/psnr", "eval/mask_iou"} <= logged
    table = [row for row in rows if "eval/prompts/_type" in row]
    assert table and json.loads(table[0]["eval/prompts/_type"]) == "table-file"
    videos = list(evaluation.parent.glob("files/media/videos/eval/turntable_*.mp4"))
    assert len(videos) == 4  # one turntable per test prompt
    assert finished(evaluation)


def test_user_wandb_mode_wins_and_is_never_rewritten(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # logged in ...
    monkeypatch.setenv("WANDB_MODE", "offline")  # ... but the user asked for offline
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert wandb_logger(project="p", save_dir=str(tmp_path)) is None
    assert os.environ["WANDB_MODE"] == "disabled"
    assert resolve_mode("online") == "online"  # the command line wins over the environment
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto") == "online"  # logged in, nothing asked
    with pytest.raises(ValueError, match="logger.wandb.mode='sometimes'"):
        resolve_mode("sometimes")


def test_user_wandb_environment_fills_the_defaults(monkeypatch, tmp_path):
    for key, value in {
        "WANDB_PROJECT": "mine",
        "WANDB_RUN_GROUP": "g",
        "WANDB_ENTITY": "t",
    }.items():
        monkeypatch.setenv(key, value)
    node = compose_train(["logger=default"], tmp_path).logger.wandb
    assert (node.project, node.group, node.entity, node.run_id) == ("mine", "g", "t", None)
    assert node.run_dir == str(tmp_path)  # the run id derives from the run directory
    cfg = compose_train(["logger=default", "logger.wandb.project=cli"], tmp_path)
    assert cfg.logger.wandb.project == "cli"  # the command line wins
