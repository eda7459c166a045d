"""evaluate.py end to end on a tiny trained checkpoint: CLIP by hand, meshes, gallery, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from eval_helpers import CHROMIUM, compose_entry, evaluate, open_in_chromium, train_tiny
from tiny_clip import save_tiny_clip

from asd3d.cameras import orbit_cameras
from asd3d.io import load_checkpoint

from cli_helpers import run_entry

VIEWS = 6
FAST = [f"num_views={VIEWS}", "view_chunk=4", "mesh.resolution=32", "gallery.mesh_resolution=24"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    ckpt = train_tiny(root / "run")
    config, weights = save_tiny_clip(root / "clip")
    clip = [f"clip.model={config}", f"clip.pretrained={weights}"]
    return root, ckpt, clip


def _hand_clip(ckpt, config, weights) -> dict[int, tuple[float, float]]:
    """Render every test prompt's orbit in one piece and score it with open_clip directly."""
    import open_clip

    from asd3d.evaluation.run import load_trained_parts, prompt_field

    checkpoint = load_checkpoint(ckpt)
    run_cfg, parts = load_trained_parts(checkpoint, torch.device("cpu"))
    orbit = run_cfg.system.validation
    cameras = orbit_cameras(VIEWS, 15.0, orbit.distance, orbit.fovy_deg)
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.stem, pretrained=str(weights)
    )
    tokenizer = open_clip.get_tokenizer(config.stem)
    texts = parts.corpus.prompts("test", range(parts.corpus.size("test")))
    white = torch.ones(VIEWS, 3)
    out = {}
    with torch.no_grad():
        text = model.eval().encode_text(tokenizer(texts)).numpy()
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        for index, prompt in enumerate(texts):
            field = prompt_field(parts, prompt, index, int(run_cfg.seed), torch.device("cpu"))
            res = int(orbit.resolution)
            rgb = parts.renderer(field, cameras, res, res, background_rgb=white).rgb
            image = model.encode_image(preprocess(rgb.clamp(0, 1))).numpy()
            cosine = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ text.T
            out[index] = (cosine[:, index].mean(), (cosine.argmax(axis=1) == index).mean())
    return out


def _check_clip_by_hand(report, ckpt, clip) -> None:
    """CLIP numbers equal a hand computation from the same embeddings (REFERENCE.md §7)."""
    config, weights = (Path(c.split("=", 1)[1]) for c in clip)
    hand = _hand_clip(ckpt, config, weights)
    for record in report["prompts"]:
        sim, r1 = hand[record["index"]]
        assert record["clip_sim"] == pytest.approx(sim, abs=1e-5)
        assert record["clip_r1"] == pytest.approx(r1, abs=1e-6)
    mean = report["mean"]
    assert mean["clip_sim"] == pytest.approx(np.mean([s for s, _ in hand.values()]), abs=1e-5)
    assert mean["clip_r1"] == pytest.approx(np.mean([r for _, r in hand.values()]), abs=1e-6)


def test_evaluate_clip_meshes_gallery(trained, capsys):
    root, ckpt, clip = trained
    out_dir = root / "eval_clip"
    means = evaluate([f"ckpt={ckpt}", *FAST, *clip, f"out_dir={out_dir}"], root / "eval_log")
    assert set(means) == {"oracle_r1", "psnr", "mask_iou", "clip_r1", "clip_sim"}
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.split() == [f"{k}={v:.4f}" for k, v in means.items()]
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["num_prompts"] == 4 and report["num_views"] == VIEWS
    _check_clip_by_hand(report, ckpt, clip)

    # Meshes in every format load with faces inside the scene box.
    radius = load_checkpoint(ckpt)["asd3d_config"]["renderer"]["radius"]
    meshes = sorted((out_dir / "meshes").iterdir())
    assert len(meshes) == 4 * 3 and not [m for m in meshes if m.name.startswith(".")]
    for path in meshes:
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) > 0 and (abs(mesh.bounds) <= radius + 1e-6).all(), path.name

    page = out_dir / "index.html"
    assert page.exists()
    if CHROMIUM is not None:
        status = open_in_chromium(page)
        assert status["videos"] == {"total": 4, "loaded": 4, "failed": 0}, status
        assert status["meshes"] == {"total": 4, "drawn": 4, "failed": 0}, status
        assert status["errors"] == [] and status["log_errors"] == [], status


def test_an_interrupted_evaluation_resumes_without_redoing_prompts(trained, capsys):
    root, ckpt, _ = trained
    out_dir = root / "eval_resume"
    common = [f"ckpt={ckpt}", *FAST, "clip.model=null", f"out_dir={out_dir}"]
    first = evaluate([*common, "max_prompts=2"], root / "log1")  # "interrupted" after 2 prompts
    records = sorted((out_dir / "prompts").glob("*.json"))
    assert [p.name for p in records] == ["00000.json", "00001.json"]
    stamps = {p: p.stat().st_mtime_ns for p in [*records, *(out_dir / "turntables").iterdir()]}
    time.sleep(0.05)
    capsys.readouterr()

    full = evaluate(common, root / "log2")
    assert "Resumed: 2 prompt(s)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "finished prompts were redone"
    assert len(list((out_dir / "prompts").glob("*.json"))) == 4
    report = json.loads((out_dir / "metrics.json").read_text())
    by_index = {r["index"]: r for r in report["prompts"]}
    assert np.mean([by_index[i]["psnr"] for i in range(4)]) == pytest.approx(full["psnr"], abs=1e-4)
    assert np.mean([by_index[i]["psnr"] for i in range(2)]) == pytest.approx(
        first["psnr"], abs=1e-4
    )

    # Other settings (more views) make every record stale: all prompts are evaluated again.
    evaluate([*common, f"num_views={VIEWS + 2}"], root / "log3")
    assert "Resumed" not in capsys.readouterr().out
    assert json.loads((out_dir / "prompts" / "00000.json").read_text())["num_views"] == VIEWS + 2


def test_export_mesh_command(trained, capsys):
    from asd3d.evaluation.run import run_mesh_export

    root, ckpt, _ = trained
    overrides = [
        f"ckpt={ckpt}",
        "prompt=a blue cube",
        "mesh.resolution=32",
        f"out_dir={root / 'm'}",
    ]
    paths = run_mesh_export(compose_entry(overrides, root / "mesh_log", name="export_mesh"))
    assert sorted(p.name for p in paths.values()) == [
        f"a_blue_cube.{f}" for f in ("glb", "obj", "ply")
    ]
    assert all(len(trimesh.load(p, force="mesh").faces) > 0 for p in paths.values())
    assert "Mesh written" in capsys.readouterr().out
    bad = [f"ckpt={ckpt}", "index=99", f"out_dir={root / 'm'}"]
    with pytest.raises(SystemExit):
        run_mesh_export(compose_entry(bad, root / "mesh_log", name="export_mesh"))
    assert "index=99 is outside the 4 prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(trained):
    """`python evaluate.py ... accelerator=cpu devices=2`: prompts sharded over 2 gloo processes
    give the numbers of one process, and those equal a hand computation."""
    root, ckpt, clip = trained
    reports = []
    for devices in (1, 2):
        out_dir = root / f"eval_ddp{devices}"
        result = run_entry(
            "evaluate.py",
            f"ckpt={ckpt}",
            *FAST,
            *clip,
            "mesh.export=false",
            "gallery.enabled=false",
            "accelerator=cpu",
            f"devices={devices}",
            f"out_dir={out_dir}",
            f"hydra.run.dir={root / f'ddp_log{devices}'}",
            timeout=400,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((out_dir / "metrics.json").read_text()))
    one, two = reports
    assert one["mean"] == two["mean"]
    strip = lambda r: [{k: v for k, v in p.items() if k != "sheet"} for p in r["prompts"]]  # noqa: E731
    assert strip(one) == strip(two)
    _check_clip_by_hand(two, ckpt, clip)
