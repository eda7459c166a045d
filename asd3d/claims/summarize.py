"""Summarise a Hydra multirun of ``train.py`` (the paper's Tab. 3 / Tab. 4 sweeps) as one table.

    python -m asd3d.claims.summarize outputs/claims/tab3/<time>
    python -m asd3d.claims.summarize outputs/claims/tab4/<time> --source eval --wandb auto

Every job of the sweep is one row: its swept override values (``distiller``, ``distiller.eta``,
``corpus.num_prompts``, ...), its final metrics and its training time. The expected jobs are
re-derived from the sweep's ``multirun.yaml`` exactly as Hydra's basic sweeper expands them, so
a job that failed, was never reached, or is still running is listed as missing with the reason,
never silently dropped.

Metrics come from one of two places (``--source``):

* ``val``: the last validation of the run (``<run>/csv/metrics.csv``: oracle R@1, PSNR and mask
  IoU on the test prompts, ``system.validation.num_views`` views each, plus CLIP R@1 / Sim when
  live validation has a CLIP model); it counts only if it was taken at the run's final step.
* ``eval``: ``<run>/eval/metrics.json`` written by ``python evaluate.py ckpt=<run>/checkpoints/
  last.ckpt`` (REFERENCE.md §7: 120 views per prompt, CLIP when its weights are available).
* ``auto`` (default): ``eval`` when every finished run has been evaluated, else ``val`` -- one
  source for the whole table, so rows stay comparable.

Writes ``summary.csv``, ``summary.md`` and ``summary.png`` (one horizontal bar chart per metric)
into the multirun directory (or ``--out``), plus the finished runs' training curves
(``curves.png``, ``curves.csv``: every validation's oracle R@1, PSNR and mask IoU against steps,
or ``--curve-x minutes``; asd3d/claims/curves.py), and logs the table and charts to W&B with
``--wandb auto|online|offline`` (default ``disabled``; asd3d/loggers.py decides online/offline).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from asd3d.claims.charts import BarPanel, bar_chart
from asd3d.claims.curves import CURVE_X, Curve, curves_csv_text, draw_curves, job_start, read_curve
from asd3d.cli import user_errors
from asd3d.io import atomic_write_text

__all__ = [
    "METRICS",
    "RunRow",
    "Summary",
    "collect",
    "expected_jobs",
    "main",
    "parse_overrides",
    "write_summary",
]

#: Metric key -> column title, in table order. Oracle metrics exist on the procedural world,
#: CLIP metrics when a CLIP model scored the run.
METRICS: dict[str, str] = {
    "oracle_r1": "R@1",
    "psnr": "PSNR (dB)",
    "mask_iou": "IoU",
    "clip_r1": "CLIP R@1",
    "clip_sim": "CLIP Sim",
}
SOURCES = ("auto", "val", "eval")
WANDB_MODES = ("disabled", "auto", "online", "offline")
VAL_PREFIX = "val/"


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """``["distiller=asd", "corpus.num_prompts=16"]`` -> ``{key: value}``, parsed by Hydra
    (so quoting, ``+key`` / ``~key`` and group overrides read as Hydra reads them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(lines))
    return {o.get_key_element(): o.get_value_element_as_str() for o in parsed}


def expected_jobs(multirun: DictConfig) -> tuple[list[str], list[dict[str, str]]]:
    """The swept keys and every job's overrides, in job-number order, from a ``multirun.yaml``.

    Rebuilds the basic sweeper's expansion: ``hydra.sweeper.params`` first, then the command
    line (a command-line key replaces the same key of ``params``), cartesian product with the
    last key varying fastest.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = multirun.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(multirun.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    swept: list[str] = []
    for override in overrides:
        key = override.get_key_element()
        if key in swept:
            swept.remove(key)  # replaced by the later (command-line) value
        if override.is_sweep_override():
            swept.append(key)
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return swept, [parse_overrides(job) for job in batch]


@dataclass
class RunRow:
    """One job of the sweep: where it ran, what it swept, what it measured."""

    job: int
    sweep: dict[str, str]
    run_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    visits_per_prompt: float | None = None
    minutes: float | None = None
    missing: str | None = None  # why it has no metrics; None when it has

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.sweep.items()) or f"job {self.job}"


@dataclass
class Summary:
    """All jobs of one multirun and the metric source the table uses."""

    multirun_dir: Path
    swept: list[str]
    rows: list[RunRow]
    source: str
    curve_x: str = "steps"  # the curves' x axis: steps or minutes
    curves: list[Curve] = field(default_factory=list)  # one per finished run that has one
    curves_missing: dict[int, str] = field(default_factory=dict)  # job -> why it has no curve

    @property
    def finished(self) -> list[RunRow]:
        return [r for r in self.rows if r.missing is None]

    @property
    def metric_keys(self) -> list[str]:
        return [k for k in METRICS if any(k in r.metrics for r in self.finished)]


def _job_dirs(multirun_dir: Path) -> dict[int, Path]:
    """Job number -> run directory, for every job directory Hydra created under the sweep."""
    found: dict[int, Path] = {}
    for hydra_yaml in sorted(multirun_dir.glob("**/.hydra/hydra.yaml")):
        run_dir = hydra_yaml.parent.parent
        job = OmegaConf.load(hydra_yaml).hydra.job
        if job.get("num") is not None:
            found[int(job.num)] = run_dir
    return found


def _final_validation(run_dir: Path, max_steps: int) -> tuple[dict[str, float] | None, str]:
    """The metrics of the run's last validation if it was taken at its final step."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return None, f"no {path.relative_to(run_dir)} (failed, or still running)"
    last: dict[str, str] | None = None
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(f"{VAL_PREFIX}oracle_r1") or row.get(f"{VAL_PREFIX}clip_r1"):
                last = row
    if last is None:
        return None, "no validation metrics in csv/metrics.csv (failed, or still running)"
    step = int(last["step"])
    if step + 1 < max_steps:  # Lightning logs validation at global_step - 1
        return None, f"unfinished: last validation at step {step + 1} of {max_steps}"
    metrics = {key: float(last[VAL_PREFIX + key]) for key in METRICS if last.get(VAL_PREFIX + key)}
    return metrics, ""


def _evaluation(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / "eval" / "metrics.json"
    if not path.exists():
        return None
    means = json.loads(path.read_text()).get("mean", {})
    return {key: float(means[key]) for key in METRICS if key in means}


def _training_minutes(run_dir: Path) -> float | None:
    """Wall time from the job's start (Hydra writes ``.hydra/config.yaml`` first) to its last
    checkpoint (written at the end of training): training plus periodic validation."""
    end = run_dir / "checkpoints" / "last.ckpt"
    if not end.exists():
        return None
    return max(0.0, end.stat().st_mtime - job_start(run_dir)) / 60.0


def _read_run(
    row: RunRow, run_dir: Path
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Fill the row's run directory, budget and time; return the run's final validation metrics
    (``None``, with ``row.missing`` saying why, when it has none) and its evaluation metrics."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    row.run_dir = run_dir
    row.steps = int(cfg.trainer.max_steps)
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    prompts_seen = row.steps * int(cfg.system.prompts_per_step) * devices
    prompts_seen *= int(cfg.trainer.accumulate_grad_batches)
    row.visits_per_prompt = prompts_seen / int(cfg.corpus.num_prompts)
    row.minutes = _training_minutes(run_dir)
    validation, why = _final_validation(run_dir, row.steps)
    if validation is None:
        row.missing = why
        return None, None
    return validation, _evaluation(run_dir)


def collect(multirun_dir: Path, source: str = "auto", curve_x: str = "steps") -> Summary:
    """Read every job of the multirun at ``multirun_dir``; see the module docstring."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is unknown; use one of {', '.join(SOURCES)}")
    if curve_x not in CURVE_X:
        raise ValueError(f"curve_x={curve_x!r} is unknown; use one of {', '.join(CURVE_X)}")
    multirun_yaml = multirun_dir / "multirun.yaml"
    if not multirun_yaml.exists():
        raise FileNotFoundError(
            f"{multirun_dir} is not a Hydra multirun directory (no multirun.yaml); "
            "pass the sweep directory of `python train.py -m ...`"
        )
    multirun = OmegaConf.load(multirun_yaml)
    if not isinstance(multirun, DictConfig) or "hydra" not in multirun:
        raise ValueError(f"{multirun_yaml} is not the config Hydra saves for a sweep")
    swept, jobs = expected_jobs(multirun)
    dirs = _job_dirs(multirun_dir)
    rows: list[RunRow] = []
    validations: dict[int, dict[str, float]] = {}
    evaluations: dict[int, dict[str, float]] = {}
    for num, overrides in enumerate(jobs):
        row = RunRow(job=num, sweep={k: overrides[k] for k in swept})
        rows.append(row)
        if num not in dirs:
            row.missing = "no run directory (the job failed at start or was never reached)"
            continue
        validation, evaluation = _read_run(row, dirs[num])
        if validation is not None:
            validations[num] = validation
        if evaluation is not None:
            evaluations[num] = evaluation
    if not validations:
        raise ValueError(
            f"{multirun_dir}: none of its {len(rows)} jobs has finished with metrics; "
            "wait for the sweep, or check each job's train.log"
        )
    if source == "auto":
        source = "eval" if len(evaluations) == len(validations) else "val"
        if evaluations and source == "val":
            print(
                f"note: {len(evaluations)} of {len(validations)} finished runs have "
                "eval/metrics.json; the table uses validation metrics for all "
                "(evaluate the rest, or pass --source eval)"
            )
    chosen = evaluations if source == "eval" else validations
    for row in rows:
        if row.job in chosen:
            row.metrics = chosen[row.job]
        elif row.missing is None:
            assert row.run_dir is not None
            ckpt = row.run_dir / "checkpoints" / "last.ckpt"
            row.missing = f"not evaluated: run python evaluate.py ckpt={ckpt}"
    if not chosen:
        raise ValueError(f"{multirun_dir}: no finished run has eval/metrics.json; use --source val")
    summary = Summary(multirun_dir, swept, rows, source, curve_x)
    for row in summary.finished:
        assert row.run_dir is not None
        curve, why = read_curve(row.job, row.label, row.run_dir, curve_x)
        if curve is None:
            summary.curves_missing[row.job] = why
        else:
            summary.curves.append(curve)
    return summary


# ---------------------------------------------------------------------------------- writers
def _format(value: float | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "psnr":
        return f"{value:.2f}"
    if key in METRICS:
        return f"{value:.3f}"
    return f"{value:.3g}"


def _table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the finished runs, shared by the CSV, Markdown and W&B."""
    metrics = summary.metric_keys
    header = [*summary.swept, *(METRICS[k] for k in metrics)]
    header += ["steps", "visits/prompt", "train min", "job"]
    body = []
    for row in summary.finished:
        body.append(
            [
                *(row.sweep[k] for k in summary.swept),
                *(_format(row.metrics.get(k), k) for k in metrics),
                str(row.steps),
                _format(row.visits_per_prompt),
                _format(row.minutes),
                str(row.job),
            ]
        )
    return header, body


def _csv_text(summary: Summary) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metrics = list(METRICS)
    writer.writerow(
        ["job", *summary.swept, *metrics, "steps", "visits_per_prompt", "train_minutes"]
        + ["source", "run_dir", "missing"]
    )
    for row in summary.rows:
        writer.writerow(
            [row.job, *(row.sweep[k] for k in summary.swept)]
            + [row.metrics.get(k, "") for k in metrics]
            + [row.steps or "", row.visits_per_prompt or "", row.minutes or ""]
            + [summary.source if row.missing is None else "", row.run_dir or "", row.missing or ""]
        )
    return buffer.getvalue()


def _markdown(summary: Summary) -> str:
    header, body = _table(summary)
    source = {
        "val": "final validation (csv/metrics.csv)",
        "eval": "evaluate.py (eval/metrics.json)",
    }[summary.source]
    lines = [
        f"# Sweep summary: {summary.multirun_dir}",
        "",
        f"{len(summary.finished)} of {len(summary.rows)} jobs finished; metrics from {source}; "
        "R@1 / PSNR / IoU are the procedural oracle's on the test prompts; visits/prompt = "
        "steps x prompts per step / corpus size; train min = job start to last checkpoint.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
    ]
    missing = [f"- job {r.job} ({r.label}): {r.missing}" for r in summary.rows if r.missing]
    missing += [
        f"- job {r.job} ({r.label}): no training curve: {summary.curves_missing[r.job]}"
        for r in summary.rows
        if r.job in summary.curves_missing
    ]
    if missing:
        lines += ["", f"## Missing ({len(missing)})", "", *missing]
    return "\n".join(lines) + "\n"


def _bar_chart(summary: Summary, path: Path) -> None:
    """One horizontal bar panel per metric, a bar per finished run, labels on the left."""
    rows = summary.finished
    panels = [
        BarPanel(
            title=METRICS[key],
            values=[r.metrics.get(key) for r in rows],
            x_limits=(0.0, 1.0) if key in ("oracle_r1", "mask_iou", "clip_r1") else None,
            format=functools.partial(_format, key=key),
        )
        for key in summary.metric_keys
    ]
    bar_chart(path, [r.label for r in rows], panels)


def write_summary(summary: Summary, out_dir: Path) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``out_dir``, and
    ``curves.csv`` / ``curves.png`` when some finished run has a training curve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"summary.{name}" for name in ("csv", "md", "png")}
    atomic_write_text(paths["csv"], _csv_text(summary))
    atomic_write_text(paths["md"], _markdown(summary))
    _bar_chart(summary, paths["png"])
    if summary.curves:
        paths["curves_csv"], paths["curves_png"] = out_dir / "curves.csv", out_dir / "curves.png"
        atomic_write_text(paths["curves_csv"], curves_csv_text(summary.curves))
        draw_curves(summary.curves, paths["curves_png"], summary.curve_x)
    else:  # no run has a curve (see summary.md): leave no stale curves of an earlier call
        for name in ("curves.csv", "curves.png"):
            (out_dir / name).unlink(missing_ok=True)
    return paths


def log_to_wandb(summary: Summary, paths: dict[str, Path], mode: str, project: str) -> None:
    """Log the table and chart as one W&B run grouped with the sweep's training runs."""
    from asd3d.loggers import wandb_logger

    multirun = OmegaConf.load(summary.multirun_dir / "multirun.yaml")
    experiment = OmegaConf.select(multirun, "hydra.runtime.choices.experiment") or "train"
    logger = wandb_logger(
        project=project,
        save_dir=str(paths["md"].parent),
        mode=mode,
        name=f"summary {summary.multirun_dir.name}",
        group=f"{experiment}/{summary.multirun_dir.name}",
        tags=["summary"],
    )
    if logger is None:
        return
    header, body = _table(summary)
    logger.log_table(key="summary/table", columns=header, data=body)
    logger.log_image(key="summary/chart", images=[str(paths["png"])])
    if "curves_png" in paths:
        logger.log_image(key="summary/curves", images=[str(paths["curves_png"])])
    logger.experiment.finish()


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m asd3d.claims.summarize",
        description="Summarise a `python train.py -m ...` sweep into summary.csv/.md/.png "
        "and its training curves into curves.csv/.png.",
    )
    parser.add_argument("multirun_dir", type=Path, help="the sweep directory (holds multirun.yaml)")
    parser.add_argument(
        "--source",
        default="auto",
        choices=SOURCES,
        help="metrics: val = final validation, eval = evaluate.py's, auto = eval if all have it",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep)")
    parser.add_argument(
        "--wandb", default="disabled", choices=WANDB_MODES, help="log the table to W&B"
    )
    parser.add_argument("--wandb-project", default="asd3d", help="W&B project")
    parser.add_argument(
        "--curve-x",
        default="steps",
        choices=CURVE_X,
        help="x axis of curves.png: optimisation steps, or wall-clock minutes since the job "
        "started (from the times of the run's validation render files)",
    )
    args = parser.parse_args(argv)
    with user_errors():
        if not args.multirun_dir.is_dir():
            raise FileNotFoundError(f"multirun directory {args.multirun_dir} does not exist")
        summary = collect(args.multirun_dir, args.source, args.curve_x)
        paths = write_summary(summary, args.out or args.multirun_dir)
        log_to_wandb(summary, paths, args.wandb, args.wandb_project)
    print(_markdown(summary), end="")
    print("Written: " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
