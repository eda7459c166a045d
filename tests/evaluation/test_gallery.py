"""The HTML gallery opens from the file system in headless Chromium with every video and mesh."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import CHROMIUM, open_in_chromium

from asd3d.evaluation.gallery import write_gallery, write_mesh_asset
from asd3d.evaluation.media import write_turntable
from asd3d.evaluation.mesh import extract_mesh
from asd3d.types import FieldOutput

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless gallery test needs chromium (apt install chromium)"
)


def _sphere(center: tuple[float, float, float], radius: float):
    c = torch.tensor(center)

    def field(points):
        return FieldOutput(
            sdf=(points - c).norm(dim=-1, keepdim=True) - radius, rgb=(points + 1.0) / 2.0
        )

    return field


def _gallery(out_dir, count: int = 3):
    entries = []
    for i in range(count):
        turntable = f"turntables/{i}.mp4"
        write_turntable(torch.rand(4, 3, 32, 32), out_dir / turntable, fps=8)
        asset = f"gallery/{i:05d}.js"
        mesh = extract_mesh(_sphere((0.1 * i, 0.0, 0.0), 0.3 + 0.1 * i), 1.0, resolution=24)
        write_mesh_asset(mesh, out_dir / asset, f"p{i}", radius=1.0)
        entries.append(
            {
                "index": i,
                "prompt": f'prompt <{i}> & "quoted" </script>',
                "clip_r1": 0.5 * i,
                "turntable": turntable,
                "mesh_asset": asset,
            }
        )
    return write_gallery(out_dir, entries, ["clip_r1"], {"clip_r1": 0.5}, "test gallery")


def test_every_video_and_mesh_loads_without_console_errors(tmp_path):
    page = _gallery(tmp_path)
    status = open_in_chromium(page)
    assert status["done"], status
    assert status["videos"] == {"total": 3, "loaded": 3, "failed": 0}, status
    assert status["meshes"] == {"total": 3, "drawn": 3, "failed": 0}, status
    assert status["errors"] == [] and status["log_errors"] == [], status


def test_missing_media_are_reported(tmp_path):
    page = _gallery(tmp_path, count=2)
    (tmp_path / "turntables" / "1.mp4").unlink()
    (tmp_path / "gallery" / "00001.js").unlink()
    status = open_in_chromium(page)
    assert status["videos"]["failed"] == 1 and status["videos"]["loaded"] == 1, status
    assert status["meshes"]["failed"] == 1 and status["meshes"]["drawn"] == 1, status
    assert any("00001.js" in error for error in status["errors"]), status
