"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022, Sec. 3) with two backends.

One parameter vector, laid out exactly as tiny-cuda-nn's ``Grid``/``Hash`` encoding stores it, and
two ways to evaluate it:

* ``tcnn`` -- tiny-cuda-nn's fused CUDA kernel (only when ``tinycudann`` imports and the input is
  on CUDA; the package is not on PyPI and must be built from source);
* ``torch`` -- a pure-PyTorch implementation with the same semantics, everywhere else.

``backend="auto"`` picks ``tcnn`` on CUDA and ``torch`` on the CPU, per call, so a module built on
the CPU and moved to a GPU switches by itself; on CUDA without tinycudann it is an error naming
``generator.grid_backend=torch`` (the pure-PyTorch grid is several times slower there: an explicit
choice, not a silent fallback). A checkpoint trained with either backend loads into the other
because the parameter layout is shared.

Semantics (tiny-cuda-nn ``encodings/grid.h``), for level ``l`` of ``L``:

* ``scale_l = 2^(l log2 b) * N_min - 1`` (float32), ``resolution_l = ceil(scale_l) + 1`` vertices
  per axis: ``N_min`` counts grid *vertices*, not cells;
* the level's table has ``T_l = min(next_multiple_8(resolution_l^3), 2^log2_hashmap_size)`` entries
  of ``F`` features, levels stored one after another;
* an input ``x in [0, 1]^3`` lands at ``pos = x * scale_l + 0.5``; its cell corner is
  ``floor(pos)`` and the trilinear weights use ``frac = pos - floor(pos)``;
* a corner's entry is ``x + y R + z R^2`` when the level's grid fits in its table
  (``R^3 <= T_l``, "dense" levels), else the coherent prime hash
  ``x * 1 xor y * 2654435761 xor z * 805459861`` (uint32 arithmetic); both modulo ``T_l``;
* the output concatenates the levels' interpolated features: ``L * F`` values, level-major.

The pure-PyTorch path is a custom autograd function: its backward recomputes the corner indices
instead of storing them, so memory per point is that of the output, not of 8 corners x L levels.
Inputs outside ``[0, 1]`` are clamped (tiny-cuda-nn would wrap around).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

HashGridBackend = Literal["auto", "torch", "tcnn"]

#: tiny-cuda-nn's coherent hashing primes for the first three dimensions.
HASH_PRIMES = (1, 2654435761, 805459861)
_UINT32_MASK = 0xFFFFFFFF
#: tiny-cuda-nn initialises grid parameters uniformly in ``[-1e-4, 1e-4]``.
TCNN_INIT_SCALE = 1e-4


@dataclass(frozen=True)
class GridLevel:
    """Geometry of one level: float32 ``scale``, vertices per axis, table entries, table offset."""

    scale: float
    resolution: int
    table_size: int
    offset: int

    @property
    def dense(self) -> bool:
        """The whole ``resolution^3`` grid fits in the table: index, don't hash."""
        return self.resolution**3 <= self.table_size


def grid_levels(
    n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> list[GridLevel]:
    """Per-level scale, resolution and table size, with tiny-cuda-nn's rounding (float32)."""
    log2_scale = np.float32(math.log2(per_level_scale))
    levels, offset = [], 0
    for level in range(n_levels):
        scale = float(np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - 1)
        resolution = int(math.ceil(scale)) + 1
        dense_entries = -(-(resolution**3) // 8) * 8  # next multiple of 8: aligned accesses
        table_size = min(dense_entries, 2**log2_hashmap_size)
        levels.append(GridLevel(scale, resolution, table_size, offset))
        offset += table_size
    return levels


def _axis_terms(coords: Int[Tensor, "*N 3"], resolution: int, dense: bool) -> Int[Tensor, "*N 3"]:
    """Per-axis parts of a vertex's table entry: strides ``1, R, R^2`` (dense levels, summed) or
    ``coord * prime mod 2^32`` (hashed levels, xor-ed)."""
    # Python-int factors, broadcast per axis: no constant tensor is copied to the device.
    factors = (1, resolution, resolution * resolution) if dense else HASH_PRIMES
    terms = torch.stack([coords[..., d] * factors[d] for d in range(3)], dim=-1)
    return terms if dense else terms & _UINT32_MASK


def _wrap(index: Tensor, table_size: int) -> Tensor:
    if table_size & (table_size - 1) == 0:  # a power of two: a mask is a cheaper modulo
        return index & (table_size - 1)
    return index % table_size


def corner_indices(
    corners: Int[Tensor, "*N 3"], resolution: int, table_size: int
) -> Int[Tensor, "*N"]:
    """Table entry of integer grid vertices (tiny-cuda-nn's ``grid_index``), int64."""
    dense = resolution**3 <= table_size
    x, y, z = _axis_terms(corners, resolution, dense).unbind(-1)
    index = x + y + z if dense else x ^ y ^ z
    return _wrap(index, table_size)


def _outer(a: Tensor, op) -> Tensor:
    """Combine per-axis pairs ``(N, 2, 3)`` over the 8 corners: ``op(op(a_x, a_y), a_z)``, ``(N, 8)``."""
    ax, ay, az = a.unbind(-1)
    return op(op(ax[:, :, None, None], ay[:, None, :, None]), az[:, None, None, :]).flatten(1)


def _level_terms(
    x: Float[Tensor, "N 3"], level: GridLevel
) -> tuple[Int[Tensor, "N 8"], Float[Tensor, "N 2 3"]]:
    """Table entries of the 8 cell corners (offset included) and the per-axis linear weights
    ``[1 - frac, frac]``. Corners are built per axis (lower, upper) and combined by broadcasting,
    so only the final ``N x 8`` index and weight tensors are materialised."""
    pos = x * level.scale + 0.5
    cell = torch.floor(pos)
    frac = pos - cell
    lower = cell.long()
    coords = torch.stack([lower, lower + 1], dim=1)  # (N, 2, 3)
    terms = _axis_terms(coords, level.resolution, level.dense)
    index = _outer(terms, torch.add if level.dense else torch.bitwise_xor)
    index = _wrap(index, level.table_size) + level.offset
    return index, torch.stack([1.0 - frac, frac], dim=1)


class _HashGridLookup(torch.autograd.Function):
    """Trilinear hash-grid lookup; backward recomputes corners (no per-corner state is saved)."""

    @staticmethod
    def forward(
        ctx: Any,
        table: Float[Tensor, "E F"],
        x: Float[Tensor, "N 3"],
        levels: tuple[GridLevel, ...],
    ) -> Float[Tensor, "N LF"]:
        ctx.save_for_backward(table, x)
        ctx.levels = levels
        outputs = []
        for level in levels:
            index, axis_weights = _level_terms(x, level)
            weights = _outer(axis_weights, torch.mul)  # (N, 8)
            outputs.append(torch.bmm(weights[:, None, :], table[index]).squeeze(1))
        return torch.cat(outputs, dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        table, x = ctx.saved_tensors
        levels: tuple[GridLevel, ...] = ctx.levels
        F = table.shape[1]
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[0] else None
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        for i, level in enumerate(levels):
            g = grad_out[:, i * F : (i + 1) * F]  # (N, F)
            index, axis_weights = _level_terms(x, level)
            if grad_table is not None:
                contrib = _outer(axis_weights, torch.mul)[..., None] * g[:, None, :]
                grad_table.index_add_(0, index.reshape(-1), contrib.reshape(-1, F))
            if grad_x is not None:
                # d weight / d x_d: the axis-d factor [1 - frac, frac] becomes scale * [-1, +1].
                g_corner = torch.bmm(table[index], g[:, :, None]).squeeze(-1)  # (N, 8)
                slope = torch.full((len(x), 2), level.scale, dtype=x.dtype, device=x.device)
                slope[:, 0] = -level.scale
                for d in range(3):
                    factors = axis_weights.clone()
                    factors[..., d] = slope
                    grad_x[:, d] += (g_corner * _outer(factors, torch.mul)).sum(dim=-1)
        return grad_table, grad_x, None


@functools.cache
def tcnn_available() -> bool:
    """Whether ``tinycudann`` imports (it needs CUDA and a source build); checked once."""
    try:
        import tinycudann  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class HashGridEncoding(nn.Module):
    """Multiresolution hash grid on ``[0, 1]^3``: ``(N, 3) -> (N, n_levels * n_features_per_level)``.

    Args:
        n_levels: number of resolution levels ``L``.
        n_features_per_level: features ``F`` stored per table entry.
        log2_hashmap_size: at most ``2^log2_hashmap_size`` entries per level.
        base_resolution: ``N_min``, vertices per axis of the coarsest level.
        per_level_scale: growth factor ``b`` of the resolution from one level to the next.
        backend: ``auto`` (tiny-cuda-nn on CUDA, an error there when it does not import; PyTorch
            on the CPU), ``torch`` or ``tcnn`` (an error when it cannot run).

    The parameter ``params`` is the flat table in tiny-cuda-nn's layout (level offsets, then
    ``entry * F + feature``), initialised uniformly in ``[-1e-4, 1e-4]`` as tiny-cuda-nn does.
    """

    def __init__(
        self,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        backend: HashGridBackend = "auto",
    ) -> None:
        super().__init__()
        checks = {
            "n_levels": n_levels >= 1,
            "n_features_per_level": n_features_per_level in (1, 2, 4, 8),
            "log2_hashmap_size": 1 <= log2_hashmap_size <= 30,
            "base_resolution": base_resolution >= 2,
            "per_level_scale": per_level_scale >= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"hash grid {name}={locals()[name]} is out of range (n_levels >= 1, "
                    "n_features_per_level in 1/2/4/8, log2_hashmap_size 1-30, "
                    "base_resolution >= 2, per_level_scale >= 1)"
                )
        if backend not in ("auto", "torch", "tcnn"):
            raise ValueError(f"hash grid backend={backend!r} is not one of auto, torch, tcnn")
        self.n_levels = int(n_levels)
        self.n_features_per_level = int(n_features_per_level)
        self.log2_hashmap_size = int(log2_hashmap_size)
        self.base_resolution = int(base_resolution)
        self.per_level_scale = float(per_level_scale)
        self.backend = backend
        self.levels = tuple(
            grid_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        )
        entries = self.levels[-1].offset + self.levels[-1].table_size
        self.params = nn.Parameter(
            torch.empty(entries * self.n_features_per_level).uniform_(
                -TCNN_INIT_SCALE, TCNN_INIT_SCALE
            )
        )
        self._tcnn: nn.Module | None = None  # built lazily on the first CUDA call

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels}, features={self.n_features_per_level}, "
            f"log2_T={self.log2_hashmap_size}, N_min={self.base_resolution}, "
            f"b={self.per_level_scale:.6g}, max_resolution={self.levels[-1].resolution}, "
            f"backend={self.backend}"
        )

    def tcnn_config(self) -> dict[str, Any]:
        """The tiny-cuda-nn encoding config with the same semantics."""
        return {
            "otype": "Grid",
            "type": "Hash",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": "Linear",
        }

    def resolve_backend(self, device: torch.device) -> Literal["torch", "tcnn"]:
        """The backend a call on ``device`` uses: ``auto`` is ``tcnn`` on CUDA (an error when
        tinycudann is missing there: the PyTorch path is an explicit opt-in, never a silent
        slowdown) and ``torch`` elsewhere."""
        if self.backend == "torch":
            return "torch"
        if device.type == "cuda" and tcnn_available():
            return "tcnn"
        if self.backend == "tcnn":
            raise ValueError(
                "hash grid backend='tcnn' needs tinycudann (built from source) and CUDA inputs; "
                f"got device={device}, tinycudann importable={tcnn_available()}; "
                "use backend=torch or backend=auto"
            )
        if device.type == "cuda":
            raise ValueError(
                "generator.grid_backend=auto on CUDA needs tinycudann, which does not import; "
                "build it (docs/performance.md) or set generator.grid_backend=torch (and "
                "renderer.background.grid_backend=torch) to opt in to the slower PyTorch hash grid"
            )
        return "torch"

    def forward(self, x: Float[Tensor, "N 3"]) -> Float[Tensor, "N LF"]:
        if x.ndim != 2 or x.shape[-1] != 3:
            raise ValueError(f"hash grid input must be (N, 3) in [0, 1], got {tuple(x.shape)}")
        x = x.clamp(0.0, 1.0)
        if self.resolve_backend(x.device) == "tcnn":
            return self._tcnn_module()(x.float().contiguous()).to(self.params.dtype)
        table = self.params.view(-1, self.n_features_per_level)
        return _HashGridLookup.apply(table, x.to(table.dtype), self.levels)

    def _tcnn_module(self) -> nn.Module:
        if self._tcnn is None:
            import tinycudann as tcnn

            module = tcnn.Encoding(3, self.tcnn_config(), dtype=torch.float32)
            if module.params.numel() != self.params.numel():
                raise RuntimeError(
                    f"tinycudann expects {module.params.numel()} grid parameters, this layout "
                    f"has {self.params.numel()}: the tinycudann version computes levels "
                    "differently"
                )
            # Share the one parameter: the kernel reads the same table the torch path does.
            module.params = self.params
            # Held outside the module tree: its parameter is ours, registered once.
            object.__setattr__(self, "_tcnn", module)
        assert self._tcnn is not None
        return self._tcnn
