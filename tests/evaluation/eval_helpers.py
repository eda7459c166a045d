"""Helpers of the evaluation tests: a tiny trained checkpoint, evaluate.py in-process, a browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from omegaconf import DictConfig, open_dict

from asd3d.build import REPO

from conftest import TINY, compose_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def train_tiny(run_dir: Path) -> Path:
    """Train the conftest's tiny quickstart for 3 steps in-process; returns ``last.ckpt``."""
    from asd3d.training import run_training

    cfg = compose_train(TINY, run_dir)
    with open_dict(cfg):
        del cfg["hydra"]  # HydraConfig holds it; a Hydra app's job config has no hydra node
    run_training(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def compose_entry(overrides: list[str], log_dir: Path, name: str = "evaluate") -> DictConfig:
    """Compose ``conf/<name>.yaml`` as its entry point would, outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(log_dir)
        cfg.hydra.runtime.output_dir = str(log_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a Hydra app: the job's config has no hydra node
    return cfg


def evaluate(overrides: list[str], log_dir: Path) -> dict[str, float]:
    from asd3d.evaluation.run import run_evaluation

    return run_evaluation(compose_entry(overrides, log_dir))


def open_in_chromium(page: Path, budget_ms: int = 15000) -> dict:
    """Open ``page#selftest`` in headless Chromium; return the page's own status report.

    The gallery writes JSON into ``<pre id="asd3d-status">``; Chromium's ``--dump-dom`` prints
    the DOM once the page is idle or the virtual-time budget is spent. Uncaught errors printed to
    Chromium's log are added under ``"log_errors"``.
    """
    assert CHROMIUM is not None
    url = page.resolve().as_uri() + "#selftest"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--enable-unsafe-swiftshader",
            "--enable-logging=stderr",
            "--v=0",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    dom = result.stdout
    start = dom.find('<pre id="asd3d-status">')
    assert start >= 0, f"no status element in the page (chromium rc {result.returncode})"
    start += len('<pre id="asd3d-status">')
    text = dom[start : dom.index("</pre>", start)]
    status = json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))
    status["log_errors"] = [
        line for line in result.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line
    ]
    return status
