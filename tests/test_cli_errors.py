"""Bad inputs: one line naming the problem, non-zero exit, nothing half-written left behind."""

import json

import pytest

from cli_helpers import run_entry, train


def last_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_clean_failure(result, run_dir, *needles):
    assert result.returncode != 0, result.stdout + result.stderr
    line = last_line(result)
    for needle in needles:
        assert needle in line, result.stderr
    assert not run_dir.exists() or not any(run_dir.rglob("*.ckpt")), "half-written output left"
    assert not run_dir.exists(), f"failed run left {list(run_dir.rglob('*'))}"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["distiller=asd", "distiller.eta=1.5"], ["eta=1.5", "[0, 1]"]),
        (["corpus.num_prompts=0"], ["num_prompts=0"]),
    ],
    ids=["eta-out-of-range", "empty-procedural-corpus"],
)
def test_bad_training_inputs(tmp_path, overrides, needles):
    run_dir = tmp_path / "run"
    assert_clean_failure(train(run_dir, *overrides), run_dir, "error:", *needles)


def test_missing_corpus_file(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        "corpus=mg15",
        "paths.corpora_dir=/nonexistent/corpora",
        f"hydra.run.dir={run_dir}",
    )
    assert_clean_failure(result, run_dir, "error:", "/nonexistent/corpora", "not found")


def test_empty_corpus_file(tmp_path):
    corpus = tmp_path / "empty_prompt_library.json"
    corpus.write_text(json.dumps({"train": [], "val": [], "test": []}))
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py", "corpus=mg15", f"corpus.path={corpus}", f"hydra.run.dir={run_dir}"
    )
    assert_clean_failure(result, run_dir, "error:", str(corpus))


def test_unknown_config_value(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "distiller=bogus")
    assert result.returncode != 0
    assert "distiller/bogus" in result.stderr
    assert not run_dir.exists()


def test_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("this is not a checkpoint")
    run_dir = tmp_path / "run"
    result = run_entry("evaluate.py", f"ckpt={bogus}", f"hydra.run.dir={run_dir}")
    assert_clean_failure(result, run_dir, "error:", str(bogus), "not a PyTorch checkpoint")
    result = train(run_dir, f"ckpt_path={bogus}")
    assert_clean_failure(result, run_dir, "error:", str(bogus))
