"""Mesh export: marching cubes on SDF and density fields, never empty, GLB/OBJ/PLY on disk."""

from __future__ import annotations

import pytest
import torch
import trimesh

from asd3d.evaluation.mesh import MESH_FORMATS, extract_mesh, field_kind_of, write_mesh
from asd3d.types import FieldOutput

RADIUS = 1.0


def _colour(points):
    return (points / RADIUS + 1.0) / 2.0


def sphere_sdf(radius: float, offset: float = 0.0):
    return lambda p: FieldOutput(sdf=p.norm(dim=-1, keepdim=True) - radius + offset, rgb=_colour(p))


def gaussian_density(peak: float):
    return lambda p: FieldOutput(
        sdf=peak * torch.exp(-p.square().sum(dim=-1, keepdim=True) / (2 * 0.3**2)), rgb=_colour(p)
    )


def test_sdf_sphere_mesh_files_load_inside_the_box_with_vertex_colours(tmp_path):
    mesh = extract_mesh(sphere_sdf(0.5), RADIUS, resolution=40)
    paths = write_mesh(mesh, tmp_path / "sphere", MESH_FORMATS)
    assert sorted(paths) == sorted(MESH_FORMATS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere.glb", "sphere.obj", "sphere.ply"]
    for fmt, path in paths.items():
        loaded = trimesh.load(path, force="mesh")
        assert len(loaded.faces) > 0, fmt
        assert (abs(loaded.bounds) <= RADIUS + 1e-6).all(), fmt
        assert loaded.volume == pytest.approx(4 / 3 * torch.pi * 0.5**3, rel=0.03), fmt
        assert loaded.visual.kind == "vertex", fmt
    # Colours are the field's colour at the vertex (world coordinates, before the y-up turn).
    expected = (_colour(torch.from_numpy(mesh.vertices)) * 255).round()
    assert (torch.from_numpy(mesh.colors).float() - expected).abs().max() <= 1.0


def test_up_axis_turns_world_z_into_file_y(tmp_path):
    shifted = lambda p: sphere_sdf(0.2)(p - torch.tensor([0.0, 0.0, 0.5]))  # noqa: E731
    mesh = extract_mesh(shifted, RADIUS, resolution=32)
    up_y = trimesh.load(write_mesh(mesh, tmp_path / "y", ["ply"], "y")["ply"])
    up_z = trimesh.load(write_mesh(mesh, tmp_path / "z", ["ply"], "z")["ply"])
    assert up_y.centroid[1] == pytest.approx(0.5, abs=0.02)
    assert up_z.centroid[2] == pytest.approx(0.5, abs=0.02)


def test_surface_cut_by_the_box_is_closed_and_clipped():
    mesh = extract_mesh(sphere_sdf(1.3), RADIUS, resolution=24)
    assert len(mesh.faces) > 0 and abs(mesh.vertices).max() <= RADIUS


def test_density_fields_use_their_level():
    mesh = extract_mesh(
        gaussian_density(100.0), RADIUS, resolution=32, field_kind="density", level=25.0
    )
    # exp(-r²/(2·0.09)) = 0.25  ->  r = 0.3·sqrt(2 ln 4)
    expected = 0.3 * (2 * torch.log(torch.tensor(4.0))).sqrt()
    assert float(torch.from_numpy(mesh.vertices).norm(dim=1).mean()) == pytest.approx(
        float(expected), abs=0.03
    )
    # Without a level, a density field is contoured at its own top-1% quantile.
    auto = extract_mesh(gaussian_density(100.0), RADIUS, resolution=32, field_kind="density")
    assert len(auto.faces) > 0 and auto.used_fallback_level and 0.0 < auto.level < 100.0


def test_an_empty_level_set_falls_back_to_the_fields_own_values():
    mesh = extract_mesh(sphere_sdf(0.0, offset=0.2), RADIUS, resolution=24)  # sdf > 0 everywhere
    assert len(mesh.faces) > 0 and mesh.used_fallback_level and mesh.level > 0.2
    constant = lambda p: FieldOutput(sdf=torch.ones_like(p[..., :1]), rgb=_colour(p))  # noqa: E731
    with pytest.raises(ValueError, match="constant over the 8\\^3 grid"):
        extract_mesh(constant, RADIUS, resolution=8)


def test_field_kind_comes_from_the_renderer(tiny_cfg):
    from hydra.utils import instantiate

    assert field_kind_of(instantiate(tiny_cfg.renderer)) == "sdf"

    class Declared:
        field_kind = "density"

    class DensityRenderer:
        normal_sign = -1.0

    assert field_kind_of(Declared()) == "density"
    assert field_kind_of(DensityRenderer()) == "density"
    with pytest.raises(ValueError, match="field_kind=sdf or field_kind=density"):
        field_kind_of(object())


def test_an_untrained_generator_exports_a_mesh(tiny_cfg):
    from hydra.utils import instantiate

    from asd3d.types import PromptBatch

    generator = instantiate(tiny_cfg.generator).eval()
    prior = instantiate(tiny_cfg.prior, corpus=instantiate(tiny_cfg.corpus))
    embedding = prior.encode_text(["a red cube"])
    prompts = PromptBatch(
        ids=torch.tensor([0]),
        texts=("a red cube",),
        tokens=embedding.tokens,
        pooled=embedding.pooled,
    )
    with torch.no_grad():
        field = generator(prompts, generator=torch.Generator().manual_seed(0))
    radius = float(tiny_cfg.renderer.radius)
    mesh = extract_mesh(field, radius, resolution=32)
    assert len(mesh.faces) > 0 and abs(mesh.vertices).max() <= radius
