"""A trained tiny run shared by the reliability tests (one short training per session)."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import train

_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    """The run directory of a 3-step tiny training (``tests/conftest.py``'s ``TINY``); trained
    once per test session. Tests must not modify it (copy what they alter)."""
    if "tiny" not in _RUNS:
        run = tmp_path_factory.mktemp("trained") / "run"
        result = train(run)
        assert result.returncode == 0, result.stderr[-3000:]
        _RUNS["tiny"] = run
    return _RUNS["tiny"]
