"""The claim sweeps (conf/experiment/claims/) and their summariser (asd3d/claims/summarize.py).

* The experiment files compose, expand to the documented number of jobs, and give every distiller
  (Tab. 3) and every shift setting (Tab. 4) the same generator, steps, optimizer, cameras and
  evaluation.
* The summariser reads a real tiny ``train.py -m experiment=claims/tab4`` sweep (2 jobs, 3 steps
  each): sweep values from Hydra's own job overrides, metrics from the final validation or from
  ``evaluate.py``'s ``eval/metrics.json``; failed and unfinished jobs are listed as missing.
* Its training curves (curves.csv / curves.png) hold exactly each run's validation rows, against
  steps or against the wall minutes of the runs' validation render files.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from asd3d.build import build_system, compose_train_config
from asd3d.claims.charts import PALETTE
from asd3d.claims.curves import Curve, draw_curves, read_curve
from asd3d.claims.summarize import collect, expected_jobs, main, parse_overrides

from cli_helpers import run_entry
from conftest import TINY

DISTILLERS = ["sds", "csd", "vsd", "asd"]
CORPUS_SIZES = ["16", "256", "10000"]

# The conftest's tiny quickstart settings, on the claims' shared setting instead, validating
# after every step (three points per training curve) and logging training rows every step too.
TINY_CLAIMS = [
    o for o in TINY if not o.startswith(("experiment=", "trainer.val_check_interval="))
] + ["trainer.val_check_interval=1", "trainer.log_every_n_steps=1"]
# Two jobs of the Tab. 4 sweep: the command line replaces the experiment's own sweep lists.
TINY_SWEEP = ["distiller.eta=0,0.2", "distiller.shift_mode=random"]


def compose(overrides: list[str], tmp_path: Path):
    return compose_train_config(overrides, tmp_path / "run")


# ------------------------------------------------------------------------------ experiments
@pytest.mark.parametrize(
    ("overrides", "swept", "count"),
    [
        pytest.param(
            ["experiment=claims/tab3"], ["distiller", "corpus.num_prompts"], 12, id="tab3"
        ),
        pytest.param(
            ["experiment=claims/tab3", "corpus.num_prompts=16"], ["distiller"], 4, id="tab3-16"
        ),
        pytest.param(
            ["experiment=claims/tab4"],
            ["distiller.eta", "distiller.shift_mode", "corpus.num_prompts"],
            18,
            id="tab4",
        ),
        pytest.param(
            ["experiment=claims/tab4", "corpus.num_prompts=16"],
            ["distiller.eta", "distiller.shift_mode"],
            6,
            id="tab4-16",
        ),
    ],
)
def test_sweeps_expand_to_the_documented_jobs(tmp_path, overrides, swept, count):
    cfg = compose(overrides, tmp_path)
    keys, jobs = expected_jobs(cfg)
    assert keys == swept
    assert len(jobs) == count
    assert len({tuple(job[k] for k in keys) for job in jobs}) == count  # no duplicate job


def test_tab3_gives_every_distiller_the_same_setting(tmp_path):
    """Only the distiller differs between the Tab. 3 jobs of one corpus size."""
    configs = {}
    for name in DISTILLERS:
        cfg = compose(["experiment=claims/tab3", f"distiller={name}"], tmp_path)
        with open_dict(cfg):
            del cfg["hydra"]  # a job's config, as train.py sees it
        configs[name] = OmegaConf.to_container(cfg, resolve=True)
        configs[name].pop("distiller")
    reference = configs["asd"]
    for name, config in configs.items():
        assert config == reference, f"distiller={name} changes more than the distiller"
    small = compose(["generator=3dconv_small"], tmp_path).generator
    assert reference["generator"] == OmegaConf.to_container(small, resolve=True)
    assert reference["prior"]["_target_"] == "asd3d.prior.procedural.ProceduralPrior"
    steps = reference["trainer"]["max_steps"]
    assert steps % reference["trainer"]["val_check_interval"] == 0  # last validation = final


def test_tab3_distillers_keep_their_paper_settings(tmp_path):
    scales = {}
    for name in DISTILLERS:
        cfg = compose(["experiment=claims/tab3", f"distiller={name}"], tmp_path)
        scales[name] = cfg.distiller.guidance_scale
    assert scales == {"sds": 100.0, "csd": 1.0, "vsd": 7.5, "asd": 7.5}


def test_tab4_jobs_set_the_shift(tmp_path):
    cfg = compose(
        ["experiment=claims/tab4", "distiller.eta=0.2", "distiller.shift_mode=deterministic"],
        tmp_path,
    )
    assert cfg.distiller._target_ == "asd3d.distiller.asd.ASDDistiller"
    assert (cfg.distiller.eta, cfg.distiller.shift_mode) == (0.2, "deterministic")


def test_the_largest_job_builds(tmp_path):
    """10,000 procedural prompts and VSD's own parts build as quickly as the quickstart's."""
    cfg = compose(["experiment=claims/tab3", "distiller=vsd", "corpus.num_prompts=10000"], tmp_path)
    system = build_system(cfg, {})
    assert system.corpus.size("train") == 10_000
    assert system.corpus.size("test") == 16


# ------------------------------------------------------------------------------ summariser
@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 2-job sweep of ``experiment=claims/tab4`` (3 steps per job), one job evaluated."""
    root = tmp_path_factory.mktemp("claims_sweep")
    sweep_dir = root / "multirun"
    done = run_entry(
        "train.py",
        "-m",
        "experiment=claims/tab4",
        *TINY_CLAIMS,
        *TINY_SWEEP,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


@pytest.fixture
def sweep_copy(sweep, tmp_path) -> Path:
    """A private copy of the sweep that a test may damage."""
    return Path(shutil.copytree(sweep, tmp_path / "multirun"))


def test_rows_carry_each_jobs_own_overrides_and_final_validation(sweep):
    summary = collect(sweep)
    assert summary.source == "val"
    assert summary.swept == ["distiller.eta"]  # shift_mode and corpus size were pinned
    assert [r.sweep for r in summary.rows] == [{"distiller.eta": "0"}, {"distiller.eta": "0.2"}]
    for row in summary.rows:
        assert row.missing is None
        assert row.run_dir is not None
        own = parse_overrides(OmegaConf.load(row.run_dir / ".hydra" / "overrides.yaml"))
        assert own["distiller.eta"] == row.sweep["distiller.eta"]  # Hydra's numbering matches
        with (row.run_dir / "csv" / "metrics.csv").open() as handle:
            last = [r for r in csv.DictReader(handle) if r["val/oracle_r1"]][-1]
        assert row.metrics["psnr"] == pytest.approx(float(last["val/psnr"]))
        assert 0.0 <= row.metrics["oracle_r1"] <= 1.0 and 0.0 <= row.metrics["mask_iou"] <= 1.0
        assert row.steps == 3
        assert row.visits_per_prompt == pytest.approx(3 * 2 / 4)  # steps x prompts/step / prompts
        assert row.minutes is not None and 0.0 <= row.minutes < 5.0


def test_writes_csv_markdown_and_chart(sweep_copy, capsys):
    paths = main([str(sweep_copy)])
    assert set(paths) == {"csv", "md", "png", "curves_csv", "curves_png"}
    markdown = paths["md"].read_text()
    assert (
        "| distiller.eta | R@1 | PSNR (dB) | IoU | steps | visits/prompt | train min | job |"
        in (markdown)
    )
    assert "| 0.2 |" in markdown and "Missing" not in markdown
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["distiller.eta"] for r in rows] == ["0", "0.2"]
    assert all(r["source"] == "val" and not r["missing"] for r in rows)
    from PIL import Image

    with Image.open(paths["png"]) as image:
        assert image.size[0] > 300 and image.size[1] > 40
    assert "| 0 |" in capsys.readouterr().out


def test_failed_and_unfinished_jobs_are_listed_as_missing(sweep_copy):
    shutil.rmtree(sweep_copy / "0")  # a job that failed at start leaves no directory
    metrics = sweep_copy / "1" / "csv" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    header, last = lines[0], lines[-1].split(",")
    last[header.split(",").index("step")] = "1"  # its last validation came before the end
    metrics.write_text("\n".join([header, ",".join(last)]) + "\n")
    with pytest.raises(ValueError, match="none of its 2 jobs has finished"):
        collect(sweep_copy)
    metrics.write_text("\n".join(lines) + "\n")
    summary = collect(sweep_copy)
    missing = {r.job: r.missing for r in summary.rows if r.missing}
    assert list(missing) == [0] and "no run directory" in missing[0]
    main([str(sweep_copy)])
    text = (sweep_copy / "summary.md").read_text()
    assert "## Missing (1)" in text and "job 0 (distiller.eta=0)" in text


def test_evaluation_metrics_are_used_when_every_run_has_them(sweep_copy, tmp_path):
    run = sweep_copy / "1"
    done = run_entry(
        "evaluate.py",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "num_views=4",
        "view_chunk=4",
        "gallery.enabled=false",
        "clip.model=null",
        f"hydra.run.dir={tmp_path / 'evaluate'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mean = OmegaConf.load(run / "eval" / "metrics.json")["mean"]
    partly = collect(sweep_copy)  # one of two evaluated: one source for all, validation
    assert partly.source == "val"
    only_eval = collect(sweep_copy, source="eval")
    by_job = {r.job: r for r in only_eval.rows}
    assert by_job[1].metrics["psnr"] == pytest.approx(mean["psnr"])
    assert "not evaluated: run python evaluate.py" in by_job[0].missing
    shutil.copytree(run / "eval", sweep_copy / "0" / "eval")
    assert collect(sweep_copy).source == "eval"


def test_bad_directories_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: multirun directory {tmp_path / 'nowhere'} does not exist"
    )
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no multirun.yaml" in err and "\n" not in err


def test_logs_the_table_to_wandb_offline(sweep_copy, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    main([str(sweep_copy), "--wandb", "offline"])
    runs = list((sweep_copy / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    images = runs[0] / "files" / "media" / "images" / "summary"
    assert any(images.glob("chart_*.png")) and any(images.glob("curves_*.png"))


# ---------------------------------------------------------------------------------- curves
def _validation_rows(run_dir: Path) -> tuple[list[dict[str, str]], int]:
    """The run's validation rows in metrics.csv, and how many training rows it has besides."""
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    validation = [r for r in rows if r["val/psnr"]]
    return validation, len(rows) - len(validation)


def _colour_pixels(image, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> int:
    return sum(1 for pixel in image.crop(box).getdata() if pixel == colour)


def test_curves_hold_each_runs_validation_rows(sweep_copy):
    from PIL import Image

    paths = main([str(sweep_copy)])
    with paths["curves_csv"].open() as handle:
        written = list(csv.DictReader(handle))
    expected = []
    for job, label in ((0, "distiller.eta=0"), (1, "distiller.eta=0.2")):
        validation, training = _validation_rows(sweep_copy / str(job))
        assert len(validation) == 3 and training > 0  # one per step; training rows left out
        for row in validation:
            for metric in ("oracle_r1", "psnr", "mask_iou"):
                value = float(row[f"val/{metric}"])
                expected.append((str(job), label, str(int(row["step"]) + 1), metric, value))
    got = [(r["job"], r["label"], r["step"], r["metric"], float(r["value"])) for r in written]
    assert got == expected
    assert {r["step"] for r in written} == {"1", "2", "3"} and not any(
        r["minutes"] for r in written
    )
    with Image.open(paths["curves_png"]) as image:
        image = image.convert("RGB")
        assert image.getextrema() != ((255, 255), (255, 255), (255, 255))  # not blank
        for run in range(2):  # (equal metrics here: the panels show the last run on top)
            assert _colour_pixels(image, PALETTE[run], (0, 0, *image.size)) > 20


def test_curve_panels_draw_every_run_in_its_colour(tmp_path):
    """Three runs with different values: each one's line and markers inside the three panels."""
    curves = [
        Curve(
            job=j,
            label=f"distiller.eta={j / 10}",
            steps=[250, 500, 750, 1000],
            minutes=None,
            values={
                "oracle_r1": [0.1 * j, 0.2 + 0.1 * j, 0.5, 0.6 - 0.1 * j],
                "psnr": [10.0 + j, 14.0 + j, 18.0, 20.0 - j],
                "mask_iou": [0.2 * j, 0.3, 0.4 + 0.1 * j, 0.8],
            },
        )
        for j in range(3)
    ]
    path = tmp_path / "curves.png"
    layout = draw_curves(curves, path)
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        assert image.size == layout.size and len(layout.panels) == 3
        for panel, box in enumerate(layout.panels):
            for run in range(3):
                assert _colour_pixels(image, PALETTE[run], box) > 30, (panel, run)
    # The legend lies outside every panel: below them, overlapping none.
    assert layout.legend is not None
    for box in layout.panels:
        assert layout.legend[1] >= box[3], (layout.legend, box)


def test_minutes_axis_uses_the_validation_render_times(sweep_copy):
    main([str(sweep_copy), "--curve-x", "minutes"])
    with (sweep_copy / "curves.csv").open() as handle:
        written = list(csv.DictReader(handle))
    for job in ("0", "1"):
        run = sweep_copy / job
        start = (run / ".hydra" / "config.yaml").stat().st_mtime
        for row in (r for r in written if r["job"] == job):
            render = run / "images" / f"val_renders_{int(row['step']):06d}.png"
            expected = (render.stat().st_mtime - start) / 60.0
            assert float(row["minutes"]) == pytest.approx(expected)
        minutes = [
            float(r["minutes"]) for r in written if r["job"] == job and r["metric"] == "psnr"
        ]
        assert minutes == sorted(minutes) and 0.0 < minutes[0] < minutes[-1] < 5.0
    (sweep_copy / "1" / "images" / "val_renders_000002.png").unlink()
    main([str(sweep_copy), "--curve-x", "minutes"])
    text = (sweep_copy / "summary.md").read_text()
    assert "job 1 (distiller.eta=0.2): no training curve: no images/val_renders_000002.png" in text
    with (sweep_copy / "curves.csv").open() as handle:
        assert {r["job"] for r in csv.DictReader(handle)} == {"0"}


def test_a_run_without_validation_rows_is_reported(sweep_copy):
    metrics = sweep_copy / "1" / "csv" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    psnr = lines[0].split(",").index("val/psnr")
    training = [line for line in lines[1:] if not line.split(",")[psnr]]
    metrics.write_text("\n".join([lines[0], *training]) + "\n")
    assert read_curve(1, "eta", sweep_copy / "1") == (
        None,
        "no validation rows (val/psnr) in csv/metrics.csv",
    )
    main([str(sweep_copy)])
    text = (sweep_copy / "summary.md").read_text()
    assert "## Missing (1)" in text and "job 1 (distiller.eta=0.2): no validation metrics" in text
    with (sweep_copy / "curves.csv").open() as handle:
        assert {r["job"] for r in csv.DictReader(handle)} == {"0"}
