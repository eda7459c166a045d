"""A trained tiny run shared by the reliability tests (one short training per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import train


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """The run directory of a 3-step tiny training (``tests/conftest.py``'s ``TINY``)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = train(run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run
