import pytest

from asd3d.schedules import ConstantSchedule, LinearSchedule


def test_linear_schedule_breakpoints_are_fractions():
    s = LinearSchedule(start=980, end=500)
    assert s(0.0) == 980 and s(1.0) == 500 and s(0.5) == pytest.approx(740)
    ramp = LinearSchedule(start=0.0, end=10.0, begin=0.8, end_at=1.0)
    assert ramp(0.5) == 0.0 and ramp(0.9) == pytest.approx(5.0) and ramp(2.0) == 10.0
    assert ConstantSchedule(20.0)(0.3) == 20.0


def test_linear_schedule_rejects_bad_breakpoints():
    with pytest.raises(ValueError, match="begin=1.5"):
        LinearSchedule(0, 1, begin=1.5)
    with pytest.raises(ValueError, match="end_at=0.1"):
        LinearSchedule(0, 1, begin=0.5, end_at=0.1)
