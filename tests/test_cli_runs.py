"""The user's commands, end to end on tiny settings: train, resume, evaluate, sweep, DDP."""

import json

import torch
import yaml

from asd3d.io import load_checkpoint

from cli_helpers import run_entry, train


def test_train_resume_evaluate(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 3
    assert ckpt["asd3d_config"]["distiller"]["_target_"].endswith("SDSDistiller")
    assert not [k for k in ckpt["state_dict"] if k.startswith("prior")], (
        "prior weights in checkpoint"
    )
    assert (run_dir / "csv" / "metrics.csv").exists()

    resumed_dir = tmp_path / "resumed"
    result = train(resumed_dir, f"ckpt_path={last}", "trainer.max_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")["global_step"] == 5

    result = run_entry(
        "evaluate.py", f"ckpt={last}", "num_views=6", f"hydra.run.dir={tmp_path / 'eval_log'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    values = dict(item.split("=") for item in last_line.split())
    assert set(values) == {"oracle_r1", "psnr", "mask_iou"}
    eval_dir = run_dir / "eval"
    report = json.loads((eval_dir / "metrics.json").read_text())
    assert report["num_prompts"] == 4 and report["num_views"] == 6
    assert abs(report["mean"]["psnr"] - float(values["psnr"])) < 1e-3
    assert len(list((eval_dir / "turntables").glob("*.mp4"))) == 4
    assert (eval_dir / "contact_sheet.png").stat().st_size > 0


def test_multirun_sweep_over_eta(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_entry(
        "train.py",
        "-m",
        "distiller=asd",
        "distiller.eta=0,0.2",
        *_tiny(),
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    etas = sorted(
        load_checkpoint(p)["asd3d_config"]["distiller"]["eta"]
        for p in sweep_dir.glob("*/checkpoints/last.ckpt")
    )
    assert etas == [0.0, 0.2]
    # The resolved config is logged as hyperparameters (what W&B filters and groups by).
    logged = sorted(
        yaml.safe_load(p.read_text())["distiller"]["eta"]
        for p in sweep_dir.glob("*/csv/hparams.yaml")
    )
    assert logged == [0.0, 0.2]


def test_ddp_two_processes_and_inside_a_sweep(tmp_path):
    """2 CPU processes (gloo) train; inside `-m` the DDP child does not re-run the sweep."""
    sweep_dir = tmp_path / "sweep"
    result = run_entry(
        "train.py",
        "-m",
        "distiller.eta=0.1",
        "distiller=asd",
        *_tiny(),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0"], f"sweep ran more jobs than asked: {jobs}"
    assert not list(tmp_path.glob("**/multiruns")), "a DDP child started its own sweep"
    assert (sweep_dir / "0" / "train_ddp.log").exists(), (
        "the DDP child did not take the job's own command line"
    )
    ckpt = load_checkpoint(sweep_dir / "0" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert torch.isfinite(
        torch.tensor([v.float().sum() for v in ckpt["state_dict"].values()])
    ).all()


def _tiny():
    from conftest import TINY

    return TINY
