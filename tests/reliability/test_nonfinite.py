"""Non-finite steps are skipped, counted and stop training after a streak; no NaN checkpoint."""

from __future__ import annotations

import pytest
import torch
from reliability_helpers import trained_run

from asd3d.build import build_system
from asd3d.callbacks import NonFiniteGuard, NonFiniteTrainingError
from asd3d.checkpoint import AtomicCheckpointIO, load_trained_system
from asd3d.io import CheckpointError, load_checkpoint

from cli_helpers import train
from conftest import bare_trainer


def _all_finite(path) -> bool:
    state = load_checkpoint(path)["state_dict"]
    return all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


def test_exploding_learning_rate_stops_with_one_line_and_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "system.lr_generator=1e6",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.nonfinite_guard.max_consecutive=3",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith("error: training stopped at step "), last_line
    assert "max_consecutive=3" in last_line
    assert "optimizer step skipped" in result.stderr  # each skipped step is warned about
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the last good checkpoint must be kept"
    assert all(_all_finite(p) for p in checkpoints)


def test_nan_weight_steps_are_skipped_and_change_nothing(tiny_cfg):
    system = build_system(tiny_cfg, {})
    weight = next(p for p in system.generator.parameters() if p.ndim > 1)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in system.state_dict().items()}
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive steps"):
        bare_trainer(5, callbacks=[guard]).fit(system)
    assert guard.skipped == 2
    after = system.state_dict()
    for key, value in before.items():
        assert torch.equal(value.nan_to_num(), after[key].nan_to_num()), f"{key} changed"


def test_checkpoint_io_refuses_non_finite_weights(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    with pytest.raises(CheckpointError, match="non-finite"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match="optimizer"):
        io.save_checkpoint(
            {
                "state_dict": {},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}],
            },
            target,
        )


def test_a_nan_checkpoint_is_refused_on_load(tmp_path_factory, tmp_path):
    checkpoint = load_checkpoint(trained_run(tmp_path_factory) / "checkpoints" / "last.ckpt")
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key].view(-1)[0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"non-finite values .* in {key}"):
        load_trained_system(path)
