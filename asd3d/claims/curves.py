"""Training curves of a sweep's runs: the periodic validations of every run, as data and a chart.

A run's validations are the rows of ``<run>/csv/metrics.csv`` (Lightning's CSVLogger) that have
``val/psnr``; the other rows are training rows. Lightning logs a validation at ``global_step - 1``,
so a row's ``step`` + 1 is the number of optimisation steps done, the x value used here (it
matches ``trainer.max_steps`` at the end of the run).

Wall-clock minutes (``x="minutes"``) are not in metrics.csv. They come from file times the run
writes anyway: the job starts when Hydra writes ``.hydra/config.yaml`` (the origin the summary's
``train min`` column uses too), and every validation writes
``images/val_renders_<steps done>.png`` (asd3d/system.py). A run whose validations do not all
have that file, or whose files are not in step order (copied without keeping file times), gets no
minutes curve, with the reason.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asd3d.claims.charts import ChartLayout, LinePanel, Series, line_chart

__all__ = [
    "CURVE_METRICS",
    "CURVE_X",
    "Curve",
    "curves_csv_text",
    "draw_curves",
    "job_start",
    "read_curve",
]

#: Metric key (``val/<key>`` in metrics.csv) -> panel title, in panel order.
CURVE_METRICS: dict[str, str] = {
    "oracle_r1": "oracle R@1",
    "psnr": "PSNR (dB)",
    "mask_iou": "mask IoU",
}
CURVE_X = ("steps", "minutes")
_UNIT_RANGE = ("oracle_r1", "mask_iou")  # metrics in [0, 1]: the panel shows all of it
_VAL_PREFIX = "val/"
_JOB_START_FILE = Path(".hydra") / "config.yaml"


@dataclass
class Curve:
    """One run's validations: x positions and each metric's value at them (NaN where absent)."""

    job: int
    label: str
    steps: list[int]  # optimisation steps done at each validation
    minutes: list[float] | None  # wall minutes since the job started; None when unknown
    values: dict[str, list[float]]  # metric key -> one value per validation

    def x(self, axis: str) -> list[float]:
        if axis == "minutes":
            if self.minutes is None:
                raise ValueError(f"job {self.job} has no wall-clock times")
            return self.minutes
        return [float(s) for s in self.steps]


def job_start(run_dir: Path) -> float:
    """When the job started (POSIX seconds): the time Hydra wrote ``.hydra/config.yaml``."""
    return (run_dir / _JOB_START_FILE).stat().st_mtime


def _validation_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get(_VAL_PREFIX + "psnr")]


def _minutes(run_dir: Path, steps: Sequence[int]) -> tuple[list[float] | None, str]:
    """Wall minutes from the job's start to each validation's render file, or why not known."""
    start = job_start(run_dir)
    times = []
    for step in steps:
        render = Path("images") / f"val_renders_{step:06d}.png"
        if not (run_dir / render).exists():
            return None, f"no {render} to time the validation at step {step}"
        times.append((run_dir / render).stat().st_mtime)
    ordered = all(a < b for a, b in zip(times, times[1:], strict=False))
    if not ordered or times[0] < start:
        return None, (
            "file times of images/val_renders_*.png are not in step order "
            "(copied without keeping file times?)"
        )
    return [(t - start) / 60.0 for t in times], ""


def read_curve(
    job: int, label: str, run_dir: Path, axis: str = "steps"
) -> tuple[Curve | None, str]:
    """The run's validation curve, or ``None`` and the reason it has none (for ``axis``)."""
    if axis not in CURVE_X:
        raise ValueError(f"curve x axis {axis!r} is unknown; use one of {', '.join(CURVE_X)}")
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return None, "no csv/metrics.csv"
    rows = _validation_rows(path)
    if not rows:
        return None, "no validation rows (val/psnr) in csv/metrics.csv"
    steps = [int(row["step"]) + 1 for row in rows]  # Lightning logs at global_step - 1
    values = {
        key: [
            float(row[_VAL_PREFIX + key]) if row.get(_VAL_PREFIX + key) else math.nan
            for row in rows
        ]
        for key in CURVE_METRICS
    }
    minutes: list[float] | None = None
    if axis == "minutes":
        minutes, why = _minutes(run_dir, steps)
        if minutes is None:
            return None, f"{why}; use --curve-x steps"
    return Curve(job=job, label=label, steps=steps, minutes=minutes, values=values), ""


def curves_csv_text(curves: Sequence[Curve]) -> str:
    """``job,label,step,minutes,metric,value``: one line per run, validation and metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", "label", "step", "minutes", "metric", "value"])
    for curve in curves:
        for i, step in enumerate(curve.steps):
            minutes = "" if curve.minutes is None else curve.minutes[i]
            for key, values in curve.values.items():
                if not math.isnan(values[i]):
                    writer.writerow([curve.job, curve.label, step, minutes, key, values[i]])
    return buffer.getvalue()


def _present(curves: Sequence[Curve]) -> list[str]:
    return [k for k in CURVE_METRICS if any(not math.isnan(v) for c in curves for v in c.values[k])]


def draw_curves(curves: Sequence[Curve], path: Path, axis: str = "steps") -> ChartLayout:
    """One panel per metric (value vs ``axis``), a line with markers per run, and a legend of
    the runs' labels below the panels; ``PALETTE[i]`` is the colour of ``curves[i]``."""
    if not curves:
        raise ValueError("no curves to draw")
    x_label = "steps" if axis == "steps" else "wall-clock minutes"
    panels = [
        LinePanel(
            title=CURVE_METRICS[key],
            series=[Series(curve.label, curve.x(axis), curve.values[key]) for curve in curves],
            x_label=x_label,
            y_limits=(-0.02, 1.02) if key in _UNIT_RANGE else None,
            integer_x=axis == "steps",
        )
        for key in _present(curves)
    ]
    return line_chart(path, panels)
