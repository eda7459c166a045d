"""Training render side: an int, or milestones over the run (the release's iNGP 64 -> 256)."""

import pytest

from asd3d.system import resolution_at

from conftest import TINY, compose_train


def test_int_and_milestones():
    assert resolution_at(64, 0.7) == 64
    schedule = {0: 64, 0.4: 256}
    assert [resolution_at(schedule, f) for f in (0.0, 0.39, 0.4, 1.0)] == [64, 64, 256, 256]
    assert resolution_at({0.5: 128, 0.0: 32}, 0.6) == 128  # order of the keys does not matter


@pytest.mark.parametrize("bad", [{0.2: 64}, {0: 64, 5000: 256}, {}])
def test_malformed_milestones_are_a_clear_error(bad):
    with pytest.raises(ValueError, match="fractions of the run"):
        resolution_at(bad, 0.0)


def test_composes_from_the_command_line(tmp_path):
    cfg = compose_train([*TINY, "system.render_resolution={0:8,0.5:16}"], tmp_path / "run")
    assert resolution_at(cfg.system.render_resolution, 0.6) == 16
