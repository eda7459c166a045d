"""Every bad value: one line ``key=value: allowed ...``, non-zero exit, no run directory left."""

from __future__ import annotations

import pytest
from reliability_helpers import trained_run

from asd3d.schema import ConfigValueError, validate_train_config

from cli_helpers import run_entry, train
from conftest import TINY, compose_train

# (override, the key=value the message starts with, a word of the allowed values)
BAD_VALUES = [
    ("trainer.max_steps=-1", "trainer.max_steps=-1", ">= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0", ">= 1"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc", "integer"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5", "integer"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0", ">= 1"),
    ("system.render_resolution=0", "system.render_resolution=0", "side >= 8"),
    ("system.render_resolution={0.5:32}", "system.render_resolution={0.5: 32}", "starting at 0"),
    ("system.prompts_per_step=0", "system.prompts_per_step=0", ">= 1"),
    ("system.lr_generator=-1", "system.lr_generator=-1", "> 0"),
    ("system.lr_generator=abc", "system.lr_generator=abc", "number"),
    ("system.lr_renderer=-0.1", "system.lr_renderer=-0.1", ">= 0"),
    ("system.lr_final_ratio=0", "system.lr_final_ratio=0", "(0, 1]"),
    ("system.validation.num_views=0", "system.validation.num_views=0", ">= 1"),
    ("distiller.guidance_scale=-1", "distiller.guidance_scale=-1", ">= 0"),
    ("distiller.weighting=bogus", "distiller.weighting=bogus", "one of sds"),
    ("distiller.grad_clip=-1", "distiller.grad_clip=-1", "or null"),
    ("distiller.t_max.start=100", "distiller.t_max={'start': 100, 'end': 500}", "t_max >= t_min"),
    ("distiller.t_min.end=1200", "distiller.t_min=", "[0, 999]"),
    ("corpus.num_prompts=0", "corpus.num_prompts=0", ">= 1"),
    ("corpus.num_test_prompts=-2", "corpus.num_test_prompts=-2", ">= 1"),
    ("corpus.test_split=val", "corpus.test_split=val", "train, heldout"),
    ("renderer.radius=0", "renderer.radius=0", "> 0"),
    (
        "callbacks.checkpoint.every_n_train_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0",
        ">= 1",
    ),
    (
        "callbacks.nonfinite_guard.max_consecutive=0",
        "callbacks.nonfinite_guard.max_consecutive=0",
        ">= 1",
    ),
    ("seed=-1", "seed=-1", "integer"),
]


@pytest.mark.parametrize(
    ("override", "start", "allowed"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES]
)
def test_schema_refuses_bad_values(tmp_path, override, start, allowed):
    cfg = compose_train([*TINY, override], tmp_path / "run")
    with pytest.raises(ConfigValueError) as error:
        validate_train_config(cfg)
    message = str(error.value)
    assert message.startswith(start) and ": allowed " in message and allowed in message, message
    assert "\n" not in message


def test_schema_accepts_every_experiment(tmp_path):
    from asd3d.checkpoint import CONF_DIR

    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    one_prompt = ["corpus=procedural", "corpus.num_prompts=1", "corpus.num_test_prompts=1"]
    for name in [None, *experiments]:
        overrides = [f"experiment={name}"] if name else []
        if name and name.startswith("ingp"):  # prompt-specific: a corpus of one prompt
            overrides += one_prompt
        validate_train_config(compose_train(overrides, tmp_path / "run"))


def _assert_one_line_failure(result, run_dir, start: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith(f"error: {start}"), lines
    assert not run_dir.exists(), "a failed start left its run directory"


CLI_BAD_VALUES = [
    "trainer.max_steps=abc",
    pytest.param("system.render_resolution=0", marks=pytest.mark.slow),
    pytest.param("distiller.t_max.start=100", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("override", CLI_BAD_VALUES)
def test_bad_values_through_the_real_cli(tmp_path, override):
    run_dir = tmp_path / "run"
    start = next(s for o, s, _ in BAD_VALUES if o == override)
    _assert_one_line_failure(train(run_dir, override), run_dir, start)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run_dir = blocker / "run"
    result = run_entry("train.py", *TINY, f"hydra.run.dir={run_dir}")
    _assert_one_line_failure(result, run_dir, f"hydra.run.dir={run_dir}: allowed a writable")


def test_checkpoint_of_another_generator_config_is_one_line(tmp_path_factory, tmp_path):
    last = trained_run(tmp_path_factory) / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "other"
    result = run_entry(
        "train.py",
        f"ckpt_path={last}",
        "generator.channels={4:32,8:16,16:8,32:4}",
        f"hydra.run.dir={run_dir}",
    )
    _assert_one_line_failure(
        result, run_dir, f"checkpoint {last} does not fit the configured model"
    )


def test_evaluate_with_nothing_to_evaluate(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    log_dir = tmp_path / "log"
    result = run_entry(
        "evaluate.py",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "max_prompts=0",
        f"out_dir={tmp_path / 'eval'}",
        f"hydra.run.dir={log_dir}",
    )
    _assert_one_line_failure(result, log_dir, "max_prompts=0: allowed")
    assert not (tmp_path / "eval").exists()


def test_empty_prompts_are_refused(tmp_path):
    import json

    from asd3d.corpus.prompt_library import PromptLibraryCorpus

    library = tmp_path / "library.json"
    library.write_text(json.dumps({"train": ["a red cube", "  "], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train\[1\]='  ': allowed a non-empty prompt"):
        PromptLibraryCorpus(library)
