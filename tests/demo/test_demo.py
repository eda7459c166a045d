"""The interactive demo: any prompt -> turntable + GLB + nearest training prompts, in a browser."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from asd3d.demo import DemoGenerator

from cli_helpers import run_entry, train
from conftest import CONF, REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Set to keep the page's screenshot (demo.png) for a person to look at.
SCREENSHOT_DIR = os.environ.get("ASD3D_DEMO_SCREENSHOT_DIR")
# Small enough for a busy CPU: 8 frames of 32² and a 32³ marching-cubes grid.
SMALL = ["num_views=8", "resolution=32", "mesh_resolution=32", "view_chunk=8"]
PROMPT = "a purple teapot floating above a wooden table"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo_run")
    result = train(run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir / "checkpoints" / "last.ckpt"


def compose_demo(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("demo", overrides=overrides)


def test_any_prompt_gives_a_turntable_a_mesh_and_neighbours(checkpoint, tmp_path):
    demo = DemoGenerator.from_checkpoint(
        compose_demo([f"ckpt={checkpoint}", *SMALL, "nearest.k=3"]), tmp_path
    )
    steps: list[tuple[float, str]] = []
    result = demo.generate(f"  {PROMPT}\n", lambda f, d: steps.append((f, d)))
    assert result.prompt == PROMPT
    frames = iio.imread(result.turntable)
    assert frames.shape == (8, 256, 256, 3)  # 32² renders upscaled by whole pixels to >= 256
    assert frames.std() > 0
    mesh = trimesh.load(result.mesh, force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and any("rendering" in d for _, d in steps)

    assert len(result.neighbours) == 3
    similarities = [s for _, s in result.neighbours]
    assert similarities == sorted(similarities, reverse=True)
    # A training prompt's nearest training prompt is itself (cosine 1).
    own = demo.parts.corpus.prompt("train", 2)
    text, similarity = demo.nearest(own, 1)[0]
    assert text == own and similarity == pytest.approx(1.0, abs=1e-3)


def test_empty_or_overlong_prompt_is_refused_in_one_line(checkpoint, tmp_path):
    cfg = compose_demo([f"ckpt={checkpoint}", *SMALL, "nearest.k=0", "max_prompt_chars=20"])
    demo = DemoGenerator.from_checkpoint(cfg, tmp_path)
    with pytest.raises(ValueError, match="prompt is empty"):
        demo.generate(" \n\t")
    with pytest.raises(ValueError, match="at most 20 are allowed"):
        demo.generate("a very long prompt about many things")
    assert not list(tmp_path.iterdir())  # nothing written for a refused prompt


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt=/nonexistent/last.ckpt"], "error: checkpoint /nonexistent/last.ckpt not found"),
        (["ckpt=x.ckpt", "num_views=0"], "error: num_views=0 must be >= 1"),
        (["ckpt=x.ckpt", "port=70000"], "error: port=70000 must be between 0 and 65535"),
    ],
)
def test_bad_options_fail_in_one_line(tmp_path, overrides, message):
    out = tmp_path / "run"
    result = run_entry("demo.py", *overrides, f"hydra.run.dir={out}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not out.exists()  # nothing half-written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"demo.py exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"demo.py did not serve {url} within {budget_s} s")


# Headless Chromium without a GPU exposes navigator.gpu but has no WebGPU adapter; Gradio's 3D
# viewer (babylon.js) then logs one error before its designed fallback to WebGL. The browser is
# presented as the WebGL-only browser it effectively is, so that every console error counts.
WEBGL_ONLY = "delete Object.getPrototypeOf(navigator).gpu;"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    CHROMIUM is None, reason="the browser test needs chromium (apt install chromium)"
)
def test_a_prompt_typed_in_the_browser_shows_the_model(checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(REPO / "demo.py"), f"ckpt={checkpoint}", f"port={port}"]
    log = (tmp_path / "demo.log").open("w")
    server = subprocess.Popen(
        [*command, *SMALL, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    problems: list[str] = []
    try:
        _wait_for_server(url, server, budget_s=240)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                tmp_path / "profile",  # a fresh profile
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1000},
            )
            page = browser.new_page()
            page.add_init_script(WEBGL_ONLY)
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#prompt textarea").press("Enter")
            page.wait_for_selector("#turntable video", timeout=180_000)
            page.wait_for_function(
                "() => { const v = document.querySelector('#turntable video');"
                " return v && v.readyState >= 2 && v.duration > 0; }",
                timeout=30_000,
            )
            canvas = page.wait_for_selector("#mesh canvas", timeout=60_000)
            page.wait_for_timeout(3000)  # let the viewer draw the loaded GLB
            shot = iio.imread(canvas.screenshot())[..., :3].astype(np.float64)
            status = page.locator("#status").inner_text()
            table = page.locator("#neighbours").inner_text()
            page.screenshot(path=str(SCREENSHOT_DIR or tmp_path) + "/demo.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert PROMPT in status and "generated in" in status, status
    # every training prompt of the 4-prompt corpus (nearest.k = 5), each with its similarity
    assert len(re.findall(r"^\s*-?[01]\.\d{3}\s*$", table, flags=re.MULTILINE)) == 4, table
    assert shot.std() > 5.0, "the 3D viewer drew nothing"  # a model on the canvas, not a blank
    assert problems == [], problems


def test_nearest_prompts_with_a_real_text_encoder(tmp_path):
    """Stable Diffusion's text path (CLIP tokenizer + text model, tiny and random here): any text,
    words it never saw included, has neighbours; a training prompt's nearest is itself."""

    sys.path.insert(0, str(REPO / "tests" / "prior"))
    from tiny_sd import RESOLUTION, TEXT_DIM, save_tiny_sd, tiny_components

    from asd3d.demo import NearestPrompts
    from asd3d.prior.stable_diffusion import StableDiffusionPrior

    path = save_tiny_sd(tmp_path / "sd", "epsilon", tiny_components(seed=0))
    prior = StableDiffusionPrior(
        pretrained=str(path), text_dim=TEXT_DIM, resolution=RESOLUTION, dtype="fp32"
    )
    train_prompts = ["a red cube", "a wooden chair", "a corgi wearing a top hat", "a blue vase"]
    nearest = NearestPrompts(prior, train_prompts, batch_size=3)
    assert nearest.embeddings.shape == (4, TEXT_DIM)
    for text in train_prompts:
        assert nearest(text, 1)[0][0] == text
    ranked = nearest("zxqv flurbish über-蛋糕", 4)
    assert sorted(t for t, _ in ranked) == sorted(train_prompts)
