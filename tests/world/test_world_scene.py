"""Analytic primitives and the batched scene field."""

from __future__ import annotations

import math

import pytest
import torch

import asd3d.world.scene as scene_module
from asd3d.types import FieldOutput
from asd3d.world.grammar import parse
from asd3d.world.primitives import PRIMITIVES, SHAPE_IDS
from asd3d.world.scene import SceneField, SceneObject, SceneSpec

RED, BLUE, GREEN = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)


def one(shape: str, scale: float = 0.2, position=(0.1, -0.2, 0.05), rgb=RED) -> SceneSpec:
    return SceneSpec((SceneObject(shape, "red", rgb, "large", scale, position),))


def sdf_at(spec: SceneSpec, offsets: list[tuple[float, float, float]]) -> list[float]:
    """SDF at points given relative to the first object's centre."""
    centre = torch.tensor(spec.objects[0].position)
    points = (torch.tensor(offsets, dtype=torch.float32) + centre).unsqueeze(0)
    return SceneField([spec])(points).sdf[0, :, 0].tolist()


S = 0.2  # object scale in the hand-value tests
HAND_VALUES = {
    # shape: [(offset from centre, expected sdf)]
    "sphere": [((0, 0, 0), -S), ((0.5, 0, 0), 0.5 - S), ((0, 0.3, 0.4), 0.5 - S)],
    "cube": [
        ((0, 0, 0), -0.8 * S),
        ((0.8 * S + 0.1,) * 3, 0.1 * math.sqrt(3)),
        ((0, 0.8 * S + 0.05, 0), 0.05),
        ((0.1 * S, 0, 0), -0.7 * S),
    ],
    "cylinder": [
        ((0, 0, 0), -0.8 * S),
        ((0, 0, 0.9 * S + 0.1), 0.1),
        ((0.8 * S + 0.03, 0, 0.9 * S + 0.04), 0.05),
    ],
    "cone": [
        ((0, 0, 0.9 * S), 0.0),
        ((0, 0, -0.9 * S - 0.1), 0.1),
        ((0.9 * S + 0.1, 0, -0.9 * S), 0.1),
        ((0, 0, -0.8 * S), -0.1 * S),
    ],
    "torus": [
        ((0.65 * S, 0, 0), -0.35 * S),
        ((0, 0, 0), 0.3 * S),
        ((0, 0, 0.2), 0.2 - 0.35 * S + (math.hypot(0.65 * S, 0.2) - 0.2)),
    ],
    "capsule": [((0, 0, 0), -0.6 * S), ((0, 0, S + 0.1), 0.1), ((0.6 * S + 0.07, 0, 0), 0.07)],
    "octahedron": [((S, 0, 0), 0.0), ((0, 0, 0), -S / math.sqrt(3))],
    "pyramid": [
        ((0, 0, 0.9 * S), 0.0),
        ((0, 0, -0.9 * S - 0.1), 0.1),
        ((0, 0, -0.85 * S), -0.05 * S),
    ],
}


@pytest.mark.parametrize("shape", list(HAND_VALUES))
def test_hand_values(shape):
    offsets, expected = zip(*HAND_VALUES[shape], strict=True)
    assert sdf_at(one(shape, S), list(offsets)) == pytest.approx(list(expected), abs=1e-5)


def test_every_primitive_has_hand_values():
    assert set(HAND_VALUES) == set(SHAPE_IDS) and len(PRIMITIVES) >= 8


@pytest.mark.parametrize("primitive", PRIMITIVES, ids=lambda p: p.name)
def test_distance_is_exact_or_a_bound(primitive):
    gen = torch.Generator().manual_seed(0)
    q = (torch.rand(4096, 3, generator=gen) * 3.0 - 1.5).requires_grad_(True)
    d = primitive.sdf(q[:, 0], q[:, 1], q[:, 2])
    (grad,) = torch.autograd.grad(d.sum(), q)
    norm = grad.norm(dim=-1)
    assert (norm <= 1.0 + 1e-4).all()  # 1-Lipschitz: never overshoots the surface
    # Every shape's bounding box holds the shape: points outside it are outside.
    extent = torch.tensor(primitive.extent)
    outside_box = (q.detach().abs() > extent + 1e-3).any(dim=-1)
    assert (d[outside_box] > 0).all()
    if primitive.exact:
        assert (norm - 1.0).abs().max() < 1e-3  # eikonal almost everywhere
        # Stepping by the distance along the gradient lands on the surface.
        projected = q.detach() - d.detach().unsqueeze(-1) * grad
        landed = primitive.sdf(projected[:, 0], projected[:, 1], projected[:, 2])
        assert landed.abs().max() < 1e-3


def test_union_takes_min_and_colour_of_nearest_object():
    two = SceneSpec(
        (
            SceneObject("sphere", "red", RED, "small", 0.1, (0.0, 0.0, 0.3)),
            SceneObject("cube", "blue", BLUE, "large", 0.2, (0.0, 0.0, -0.2)),
        )
    )
    three = SceneSpec(
        tuple(
            SceneObject("sphere", c, rgb, "small", 0.1, (x, 0.0, 0.0))
            for c, rgb, x in (("red", RED, -0.4), ("blue", BLUE, 0.0), ("green", GREEN, 0.4))
        )
    )
    field = SceneField([two, three])
    points = torch.tensor(
        [
            [[0.0, 0.0, 0.3], [0.0, 0.0, -0.2], [0.0, 0.0, 0.5], [0.0, 0.0, 0.05]],
            [[-0.45, 0.0, 0.0], [0.05, 0.0, 0.0], [0.5, 0.0, 0.0], [0.3, 0.3, 0.0]],
        ]
    )
    out = field(points)
    assert isinstance(out, FieldOutput)
    assert out.sdf.shape == (2, 4, 1) and out.rgb.shape == (2, 4, 3)
    # (0, 0, 0.05) is 0.15 from the sphere but 0.09 above the cube's top face (z = -0.04).
    expected_sdf = torch.tensor(
        [[-0.1, -0.16, 0.1, 0.09], [-0.05, -0.05, 0.0, math.hypot(0.1, 0.3) - 0.1]]
    )
    torch.testing.assert_close(out.sdf[..., 0], expected_sdf, atol=1e-5, rtol=0)
    assert out.rgb.tolist() == [
        [list(c) for c in row] for row in ([RED, BLUE, RED, BLUE], [RED, BLUE, GREEN, GREEN])
    ]
    per_object = field.object_sdf(points)
    assert per_object.shape == (2, 3, 4)
    assert (per_object[0, 2] > 100).all()  # padding slot of the two-object scene


def test_chunked_evaluation_matches_and_keeps_gradients(monkeypatch):
    specs = [
        parse("a small red cube on top of a large blue cylinder next to a medium green torus"),
        parse("a large pink cone behind a small cyan octahedron"),
        parse("a medium black pyramid"),
    ]
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(3, 2000, 3, generator=gen) * 1.6 - 0.8
    field = SceneField(specs)
    whole = field(points)
    monkeypatch.setattr(scene_module, "_CHUNK_ELEMENTS", 1000)
    assert len(field._chunks(points)) > 1
    chunked = field(points.requires_grad_(True))
    assert torch.equal(chunked.sdf.detach(), whole.sdf) and torch.equal(chunked.rgb, whole.rgb)
    (grad,) = torch.autograd.grad(chunked.sdf.sum(), points)
    assert torch.isfinite(grad).all() and grad.norm(dim=-1).max() <= 1.0 + 1e-4


def test_scene_objects_lie_where_the_spec_says():
    spec = parse("a large red sphere to the left of a small blue cube")
    field = SceneField([spec])
    centres = torch.tensor([[o.position for o in spec.objects]])
    out = field(centres)
    torch.testing.assert_close(out.rgb[0], torch.tensor([o.rgb for o in spec.objects]))
    assert out.sdf[0, 0, 0].item() == pytest.approx(-spec.objects[0].scale, abs=1e-6)


def test_bad_inputs():
    field = SceneField([one("sphere")])
    with pytest.raises(ValueError, match=r"1 x N x 3, got \(2, 5, 3\)"):
        field(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="at least one"):
        SceneField([])
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        SceneField([one("blob")])
    with pytest.raises(ValueError, match="at least one object"):
        SceneSpec(())
