"""The prepared GPU check (asd3d.bench_gpu) runs end to end with tiny networks on the CPU, so the
script the next session with a device runs cannot rot; and bf16-mixed trains every recipe."""

from __future__ import annotations

import json

from asd3d.bench_gpu import RECIPES, main


def test_bench_gpu_tiny_writes_every_recipe_in_bf16(tmp_path):
    rc = main(
        [
            "--size=tiny",
            f"--out={tmp_path}",
            "--steps=1",
            "--warmup=0",
            "--variants=bf16",
            "--distiller-steps=1",
            "--recipes=" + ",".join(RECIPES),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    timing = report["sections"]["timing"]
    assert set(timing) == {f"{recipe}/bf16" for recipe in RECIPES}
    for result in timing.values():
        assert "error" not in result, result
        assert result["finite_loss"] and result["median_ms"] > 0 and result["x_floor"] > 0
    assert set(report["sections"]["distillers"].values()) == {"ok"}
    assert "| df415_3dconv_sd | bf16 |" in (tmp_path / "bench_gpu.md").read_text()
