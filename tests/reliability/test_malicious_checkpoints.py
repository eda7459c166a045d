"""Checkpoints are shared between people: nothing in one may run code or choose what is built.

Each malicious checkpoint below passes ``torch.load(weights_only=True)`` (it holds only plain
containers and tensors) but asks, in its stored config or its recipe, for a file write
(``asd3d.io.atomic_write_text``) or an unsafe pickle load (``torch.load`` with
``weights_only: false``). Every entry point must refuse with one line, or ignore the stored config,
and the marker file must never appear.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from reliability_helpers import trained_run

from asd3d.checkpoint import RunRecipe, load_trained_system, resume_argv
from asd3d.io import CONFIG_KEY, RECIPE_KEY, CheckpointError, load_checkpoint

from cli_helpers import run_entry


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


class _WritesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from asd3d.io import atomic_write_text

        return (atomic_write_text, (self.marker, "code ran"))


def _write_target(marker) -> dict:
    return {"_target_": "asd3d.io.atomic_write_text", "path": str(marker), "text": "code ran"}


def _torch_load_target(tmp_path, marker) -> dict:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_WritesMarkerWhenUnpickled(marker)))
    return {"_target_": "torch.load", "f": str(evil), "weights_only": False}


def _malicious(run_dir, tmp_path, case: str):
    """A copy of the run's checkpoint, altered as ``case`` says; returns (path, marker)."""
    marker = tmp_path / "marker.txt"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    recipe = checkpoint[RECIPE_KEY]
    if case == "old-checkpoint-with-write-target":
        del checkpoint[RECIPE_KEY]
        checkpoint[CONFIG_KEY]["generator"] = _write_target(marker)
    elif case == "stored-config-torch-load":
        # The recipe is intact: the stored config must simply never be built.
        checkpoint[CONFIG_KEY]["generator"] = _torch_load_target(tmp_path, marker)
        checkpoint[CONFIG_KEY]["prior"] = _write_target(marker)
    elif case == "override-target":
        recipe["overrides"].append("generator._target_=asd3d.io.atomic_write_text")
    elif case == "override-dict-with-target":
        target = _torch_load_target(tmp_path, marker)
        recipe["overrides"].append(
            f"+generator.extra={{_target_:torch.load,f:'{target['f']}',weights_only:false}}"
        )
    elif case == "override-interpolation":
        recipe["overrides"].append("corpus.name=${oc.env:HOME}")
    elif case == "override-hydra":
        recipe["overrides"].append("hydra.searchpath=[file:///tmp]")
    elif case == "override-package":
        recipe["overrides"].append("corpus@system.optimizer=procedural")
    elif case == "choice-outside-conf":
        evil = tmp_path / "evil.yaml"
        evil.write_text(f"_target_: asd3d.io.atomic_write_text\npath: {marker}\ntext: code ran\n")
        recipe["choices"]["generator"] = f"../../../../../../..{tmp_path}/evil"
    elif case == "unknown-group":
        recipe["choices"]["launcher"] = "evil"
    else:
        raise AssertionError(case)
    path = tmp_path / f"{case}.ckpt"
    torch.save(checkpoint, path)
    return path, marker


REFUSED = [
    ("old-checkpoint-with-write-target", "no run recipe"),
    ("override-target", "_target_"),
    ("override-dict-with-target", "_target_"),
    ("override-interpolation", "interpolation"),
    ("override-hydra", "Hydra's own settings"),
    ("override-package", "another package"),
    ("choice-outside-conf", "not in conf/generator/"),
    ("unknown-group", "'launcher'"),
]


@pytest.mark.parametrize(("case", "reason"), REFUSED, ids=[c for c, _ in REFUSED])
def test_unsafe_recipes_are_refused_in_process(run_dir, tmp_path, case, reason):
    path, marker = _malicious(run_dir, tmp_path, case)
    checkpoint = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused") as error:
        RunRecipe.from_checkpoint(checkpoint, f"checkpoint {path}")
    assert reason in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError):
        load_trained_system(path)
    with pytest.raises(CheckpointError):
        resume_argv([f"ckpt_path={path}"])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("script", "case"),
    [
        ("evaluate.py", "old-checkpoint-with-write-target"),
        pytest.param("evaluate.py", "override-dict-with-target", marks=pytest.mark.slow),
        pytest.param("evaluate.py", "choice-outside-conf", marks=pytest.mark.slow),
        ("export_mesh.py", "override-target"),
        ("train.py", "override-target"),
        pytest.param("train.py", "old-checkpoint-with-write-target", marks=pytest.mark.slow),
    ],
)
def test_entry_points_refuse_with_one_line_and_write_nothing(run_dir, tmp_path, script, case):
    path, marker = _malicious(run_dir, tmp_path, case)
    log_dir = tmp_path / "log"
    key = "ckpt_path" if script == "train.py" else "ckpt"
    result = run_entry(script, f"{key}={path}", f"hydra.run.dir={log_dir}")
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: checkpoint ") and "refused" in lines[-1], lines
    assert len(lines) == 1, f"more than one line of error output: {lines}"
    assert not marker.exists()
    assert not log_dir.exists()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "meshes").exists()


def test_stored_config_is_never_built(run_dir, tmp_path):
    """A checkpoint whose stored (record) config asks for code: evaluation and
    load_from_checkpoint rebuild from conf/ and the recipe, so the code never runs."""
    path, marker = _malicious(run_dir, tmp_path, "stored-config-torch-load")
    from asd3d.system import DistillationSystem

    system = DistillationSystem.load_from_checkpoint(path)
    assert system.run_recipe == load_checkpoint(path)[RECIPE_KEY]
    assert not marker.exists()
    result = run_entry(
        "evaluate.py",
        f"ckpt={path}",
        "num_views=2",
        "max_prompts=1",
        "gallery.enabled=false",
        f"out_dir={tmp_path / 'eval'}",
        f"hydra.run.dir={tmp_path / 'log'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
