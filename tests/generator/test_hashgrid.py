"""Hash grid: level layout, indexing, trilinear weights and gradients against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asd3d.generator.hashgrid import (
    HashGridEncoding,
    corner_indices,
    grid_levels,
    tcnn_available,
)

# 3 levels, 64-entry tables: resolutions 2, 4, 8 -> 8 (dense), 64 (dense, exactly full) and
# 512 > 64 entries (hashed): every indexing branch on a grid small enough for brute force.
TINY = dict(
    n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0
)
RELEASE = dict(
    n_levels=16,
    n_features_per_level=2,
    log2_hashmap_size=19,
    base_resolution=16,
    per_level_scale=1.447269237440378,
)


def tiny_grid(dtype=torch.float64, **overrides) -> HashGridEncoding:
    torch.manual_seed(0)
    grid = HashGridEncoding(**{**TINY, **overrides}, backend="torch").to(dtype)
    with torch.no_grad():  # O(1) values so that interpolation errors are visible
        grid.params.uniform_(-1.0, 1.0)
    return grid


def reference_encoding(grid: HashGridEncoding, x: torch.Tensor) -> torch.Tensor:
    """Point-by-point, corner-by-corner evaluation with Python integers (uint32 hashing)."""
    F = grid.n_features_per_level
    log2_b = np.float32(math.log2(grid.per_level_scale))
    table = grid.params.detach()
    out = torch.zeros(len(x), grid.n_levels * F, dtype=table.dtype)
    offset = 0
    for level in range(grid.n_levels):
        scale = float(np.exp2(np.float32(level) * log2_b) * np.float32(grid.base_resolution) - 1)
        res = math.ceil(scale) + 1
        size = min(math.ceil(res**3 / 8) * 8, 2**grid.log2_hashmap_size)
        for n, point in enumerate(x.tolist()):
            pos = [c * scale + 0.5 for c in point]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell, strict=True)]
            for corner in range(8):
                v = [cell[d] + ((corner >> d) & 1) for d in range(3)]
                w = math.prod(frac[d] if (corner >> d) & 1 else 1 - frac[d] for d in range(3))
                if res**3 <= size:
                    index = v[0] + v[1] * res + v[2] * res * res
                else:
                    index = (v[0] ^ (v[1] * 2654435761) ^ (v[2] * 805459861)) & 0xFFFFFFFF
                entry = offset + index % size
                out[n, level * F : (level + 1) * F] += w * table[entry * F : (entry + 1) * F]
        offset += size
    return out


def test_release_layout_matches_the_release_parameter_count():
    levels = grid_levels(16, 19, 16, 1.447269237440378)
    assert [lv.resolution for lv in levels[:5]] == [16, 24, 34, 49, 71]
    assert levels[-1].resolution == 4096
    assert [lv.dense for lv in levels] == [True] * 5 + [False] * 11
    # REFERENCE.md §3: the release's Hyper-iNGP hash grid holds 12,599,920 parameters.
    assert HashGridEncoding(**RELEASE, backend="torch").params.numel() == 12_599_920
    # The release's background grid: scale 1 keeps every level at 16^3 = 4096 dense entries.
    background = HashGridEncoding(16, 2, 19, 16, 1.0, backend="torch")
    assert background.params.numel() == 16 * 4096 * 2


def test_corner_indices_hand_values():
    # dense: x + y R + z R^2
    assert corner_indices(torch.tensor([1, 2, 3]), resolution=4, table_size=64) == 1 + 8 + 48
    # hashed: 1 ^ (2 * 2654435761 mod 2^32 = 1013904226) ^ (3 * 805459861 = 2416379583)
    # = 2892625372, modulo 64 = 28
    assert corner_indices(torch.tensor([1, 2, 3]), resolution=8, table_size=64) == 28
    big = torch.tensor([4096, 4096, 4096])  # products beyond 2^32 wrap as uint32
    expected = ((4096 ^ (4096 * 2654435761) ^ (4096 * 805459861)) & 0xFFFFFFFF) % 2**19
    assert corner_indices(big, resolution=4096, table_size=2**19) == expected


def test_matches_brute_force_reference():
    grid = tiny_grid()
    x = torch.rand(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # box faces: the last vertex row
    got = grid(x)
    assert got.shape == (40, 6)
    torch.testing.assert_close(got, reference_encoding(grid, x), rtol=1e-12, atol=1e-12)


def test_trilinear_interpolation_reproduces_a_linear_table():
    """Vertex values a . v + b interpolate to exactly a . pos + b, with pos = x * scale + 0.5."""
    grid = tiny_grid(n_levels=1, n_features_per_level=1, base_resolution=4)
    level = grid.levels[0]
    assert level.dense
    a, b = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), 0.7
    R = level.resolution
    v = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        grid.params.zero_()
        grid.params[corner_indices(v, R, level.table_size)] = v.double() @ a + b
    # pos stays below R - 1 so no corner leaves the grid
    x = torch.rand(50, 3, dtype=torch.float64) * (R - 1.5) / level.scale
    expected = (x * level.scale + 0.5) @ a + b
    torch.testing.assert_close(grid(x)[:, 0], expected, rtol=1e-12, atol=1e-12)
    # at a vertex the output is that vertex's entry alone
    vertex = torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        grid((vertex - 0.5) / level.scale)[:, 0], vertex @ a + b, rtol=0, atol=1e-12
    )


def test_gradients_wrt_table_and_points():
    grid = tiny_grid()
    # keep points off cell boundaries, where the interpolant is not differentiable
    x = (
        torch.rand(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.8
        + 0.1
    )
    x.requires_grad_(True)
    table = grid.params.detach().clone().requires_grad_(True)

    def lookup(params, points):
        return torch.func.functional_call(grid, {"params": params}, (points,))

    assert torch.autograd.gradcheck(lookup, (table, x), eps=1e-6, atol=1e-7)
    # the table gradient scatters the trilinear weights: they sum to 1 per point and level
    (g,) = torch.autograd.grad(lookup(table, x.detach())[:, ::2].sum(), table)
    assert g.sum().item() == pytest.approx(6 * 3)


def test_backend_choice_and_errors():
    grid = HashGridEncoding(**TINY)
    assert grid.backend == "auto" and grid.resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend='tcnn' needs tinycudann"):
        HashGridEncoding(**TINY, backend="tcnn")(torch.rand(4, 3))
    with pytest.raises(ValueError, match="backend='cuda'"):
        HashGridEncoding(**TINY, backend="cuda")
    with pytest.raises(ValueError, match="per_level_scale=0.5"):
        HashGridEncoding(**{**TINY, "per_level_scale": 0.5})
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        grid(torch.rand(2, 4, 3))


def test_points_outside_the_unit_cube_are_clamped():
    grid = tiny_grid()
    x = torch.tensor([[-0.5, 0.3, 1.7]], dtype=torch.float64)
    torch.testing.assert_close(grid(x), grid(x.clamp(0, 1)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_backend_matches_cpu():
    grid = tiny_grid(torch.float32, **RELEASE)
    x = torch.rand(10000, 3)
    cpu = grid(x)
    gpu = grid.to("cuda").to(torch.float32)
    gpu.backend = "torch"
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and tcnn_available()), reason="needs CUDA and tinycudann"
)
def test_tcnn_and_torch_backends_agree_on_the_same_parameters():
    grid = tiny_grid(torch.float32, **RELEASE).cuda()
    x = torch.rand(20000, 3, device="cuda")
    grid.backend = "tcnn"
    fast = grid(x)
    (fast.square().sum()).backward()
    grad_fast = grid.params.grad.clone()
    grid.params.grad = None
    grid.backend = "torch"
    slow = grid(x)
    (slow.square().sum()).backward()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_fast, grid.params.grad, rtol=1e-3, atol=1e-3)
