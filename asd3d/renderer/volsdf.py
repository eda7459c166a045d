"""VolSDF volume rendering of signed-distance fields (REFERENCE.md §4).

Density from the signed distance (VolSDF, Yariv et al. 2021, Eq. 2-3)::

    sigma(x) = alpha * Psi_beta(-sdf(x)),   alpha = 1 / beta,
    Psi_beta(s) = 0.5 exp(s / beta)            if s <= 0
                = 1 - 0.5 exp(-s / beta)       if s > 0      (Laplace CDF, zero mean, scale beta)

and the usual quadrature of the volume-rendering integral: with sample ``i`` owning the interval
between the midpoints to its neighbours (``delta_i``), ``T_i = exp(-sum_{j<i} sigma_j delta_j)``
and weight ``w_i = T_i - T_{i+1}``; colour ``sum w_i c_i`` is composited over the background.

Rays are clipped to the scene box ``[-radius, radius]^3`` instead of a fixed far plane, which the
release used and which cannot reach the object from MVDream's distant narrow-fov cameras (§5).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from asd3d.cameras import camera_rays
from asd3d.types import Cameras, Field, RenderOutput

# exp(-60) ~ 1e-26 is still a normal float32; larger exponents produce denormals, which make
# CPU arithmetic several times slower, and contribute nothing visible.
DENSITY_EXPONENT_CLAMP = 60.0
OPTICAL_DEPTH_CLAMP = 60.0
# Central differences along +-x, +-y, +-z (pairs of rows).
_FD_DIRECTIONS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def ray_box_intersection(
    origins: Float[Tensor, "*R 3"],
    directions: Float[Tensor, "*R 3"],
    radius: float,
    near_min: float = 0.0,
) -> tuple[Float[Tensor, "*R"], Float[Tensor, "*R"], Bool[Tensor, "*R"]]:
    """Entry/exit distances of rays through the box ``[-radius, radius]^3`` (slab method).

    ``near`` is at least ``near_min`` (a camera inside the box starts there). Rays that miss the
    box, or leave it before ``near_min``, get ``hit = False`` and ``far == near`` (empty).
    """
    # An axis-parallel ray gives 0 * inf = NaN in the slab test; a tiny component is exact enough.
    tiny = torch.finfo(directions.dtype).tiny ** 0.5
    safe = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny), directions)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near_min)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return near, torch.where(hit, far, near), hit


def laplace_density(sdf: Float[Tensor, "*N"], beta: float) -> Float[Tensor, "*N"]:
    """VolSDF density ``(1/beta) Psi_beta(-sdf)`` (Eq. 2-3), exponent clamped against denormals."""
    half = 0.5 * torch.exp(-(sdf.abs() / beta).clamp(max=DENSITY_EXPONENT_CLAMP))
    return torch.where(sdf >= 0, half, 1.0 - half) / beta


def interval_edges(
    t: Float[Tensor, "*R S"], near: Float[Tensor, "*R"], far: Float[Tensor, "*R"]
) -> Float[Tensor, "*R S+1"]:
    """Boundaries of the intervals owned by sorted samples ``t``: near, midpoints, far."""
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    return torch.cat([near[..., None], mids, far[..., None]], dim=-1)


def composite_weights(
    density: Float[Tensor, "*R S"], edges: Float[Tensor, "*R S+1"]
) -> Float[Tensor, "*R S"]:
    """Volume-rendering weights ``w_i = T_i - T_{i+1}`` (sum = opacity ``1 - T_S``).

    Written as a difference of clamped transmittances (``T >= e^-60``) rather than
    ``T_i (1 - exp(-sigma_i delta_i))``: the difference of two normal floats is never a
    denormal, whereas the product of a tiny transmittance and a tiny alpha is.
    """
    delta = (edges[..., 1:] - edges[..., :-1]).clamp_min(0.0)
    optical = torch.cumsum(density * delta, dim=-1)
    optical = torch.cat([torch.zeros_like(optical[..., :1]), optical], dim=-1)
    transmittance = torch.exp(-optical.clamp(max=OPTICAL_DEPTH_CLAMP))
    return transmittance[..., :-1] - transmittance[..., 1:]


def sample_pdf(
    edges: Float[Tensor, "*R S+1"], weights: Float[Tensor, "*R S"], u: Float[Tensor, "*R K"]
) -> Float[Tensor, "*R K"]:
    """Inverse-CDF samples of the piecewise-constant density ``weights`` over ``edges``.

    ``u`` in ``[0, 1]`` (jittered in training, evenly spaced in evaluation). A small floor on the
    weights keeps the CDF strictly increasing on empty rays.
    """
    pdf = weights + 1e-5
    pdf = pdf / pdf.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(pdf, dim=-1)
    cdf = torch.cat(
        [torch.zeros_like(cdf[..., :1]), cdf[..., :-1], torch.ones_like(cdf[..., :1])], dim=-1
    )
    upper = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    upper = upper.clamp(1, weights.shape[-1])
    lower = upper - 1
    cdf_lo, cdf_hi = cdf.gather(-1, lower), cdf.gather(-1, upper)
    edge_lo, edge_hi = edges.gather(-1, lower), edges.gather(-1, upper)
    frac = ((u - cdf_lo) / (cdf_hi - cdf_lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    return edge_lo + frac * (edge_hi - edge_lo)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Draw where the generator lives (a CPU generator may drive a CUDA render), then move.
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _query(field: Field, *points: Tensor) -> list[tuple[Tensor, Tensor]]:
    """One field call for several point sets ``P x ... x 3``; returns ``(sdf ..., rgb ... x 3)``."""
    P = points[0].shape[0]
    flat = [x.reshape(P, -1, 3) for x in points]
    out = field(torch.cat(flat, dim=1) if len(flat) > 1 else flat[0])
    sizes = [x.shape[1] for x in flat]
    results = []
    for x, sdf, rgb in zip(
        points, out.sdf.split(sizes, dim=1), out.rgb.split(sizes, dim=1), strict=True
    ):
        results.append((sdf.reshape(x.shape[:-1]), rgb.reshape(*x.shape[:-1], 3)))
    return results


def _fd_points(x: Float[Tensor, "*N 3"], eps: float) -> Float[Tensor, "*N 6 3"]:
    offsets = x.new_tensor(_FD_DIRECTIONS) * eps
    return x[..., None, :] + offsets


def _fd_gradient(sdf: Float[Tensor, "*N 6"], eps: float) -> Float[Tensor, "*N 3"]:
    return (sdf[..., 0::2] - sdf[..., 1::2]) / (2.0 * eps)


@dataclass
class _Rays:
    """Per-ray foreground composites (``P x R``), before the background."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    normals: Tensor | None
    background: Tensor | None

    @staticmethod
    def cat(items: list[_Rays]) -> _Rays:
        def join(values: list) -> Any:
            return None if values[0] is None else torch.cat(values, dim=1)

        return _Rays(
            **{f.name: join([getattr(item, f.name) for item in items]) for f in fields(_Rays)}
        )


class VolSDFRenderer(nn.Module):
    """Volume-renders a :class:`~asd3d.types.Field` of signed distances (REFERENCE.md §4).

    Per ray: stratified samples in the ray's span inside the scene box, then importance samples
    from the coarse weights' CDF (no gradient through the sampling), union sorted, composited.
    The field is called with all views of a prompt at once (``P x (V R S) x 3``): once for the
    coarse samples, once for the importance samples, and, only when asked, once for the
    finite-difference probes of the normals and once for the eikonal probes. Without gradients
    (or in eval mode) rays are processed in chunks of ``chunk_rays`` (split across the rays of
    each prompt group) so 120 views at 512² fit in bounded memory.

    Args:
        background: module mapping unit directions ``(*, 3)`` to colours ``(*, 3)`` in [0, 1].
        radius: half-size of the axis-aligned scene box rays are clipped to.
        num_samples_stratified: stratified samples per ray (jittered in training, bin centres in
            eval).
        num_samples_importance: extra samples per ray drawn from the coarse weights (0: none).
        beta: Laplace scale of the VolSDF density (release: 1/30, fixed).
        near_min: smallest distance from the camera at which a ray starts.
        background_augmentation_prob: in training, probability per image of replacing the
            background by a random solid colour (release: 0.5 for SD runs).
        eikonal_points: ``M`` random points in the box per prompt at which, in training, SDF
            gradients are returned for the eikonal loss (0: none).
        chunk_rays: rays per chunk when rendering without gradients.
        finite_difference_eps: step of the central differences for normals and SDF gradients.
    """

    def __init__(
        self,
        background: nn.Module,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        beta: float,
        near_min: float = 0.05,
        background_augmentation_prob: float = 0.0,
        eikonal_points: int = 0,
        chunk_rays: int = 65536,
        finite_difference_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        checks = {
            "radius": radius > 0,
            "num_samples_stratified": num_samples_stratified >= 1,
            "num_samples_importance": num_samples_importance >= 0,
            "beta": beta > 0,
            "near_min": near_min >= 0,
            "background_augmentation_prob": 0.0 <= background_augmentation_prob <= 1.0,
            "eikonal_points": eikonal_points >= 0,
            "chunk_rays": chunk_rays >= 1,
            "finite_difference_eps": finite_difference_eps > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={locals()[name]} is out of range")
        self.background = background
        self.radius = float(radius)
        self.num_samples_stratified = int(num_samples_stratified)
        self.num_samples_importance = int(num_samples_importance)
        self.beta = float(beta)
        self.near_min = float(near_min)
        self.background_augmentation_prob = float(background_augmentation_prob)
        self.eikonal_points = int(eikonal_points)
        self.chunk_rays = int(chunk_rays)
        self.finite_difference_eps = float(finite_difference_eps)

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, samples={self.num_samples_stratified}"
            f"+{self.num_samples_importance}, beta={self.beta:.4g}, near_min={self.near_min}, "
            f"bg_aug={self.background_augmentation_prob}, eikonal_points={self.eikonal_points}"
        )

    def forward(
        self,
        field: Field,
        cameras: Cameras,
        height: int,
        width: int,
        *,
        generator: torch.Generator | None = None,
        background_rgb: Float[Tensor, "B 3"] | None = None,
        compute_normals: bool = False,
    ) -> RenderOutput:
        """Render ``B = P * V`` images of ``height x width``.

        ``background_rgb`` replaces the background by a fixed colour per image (no augmentation).
        ``depth`` is the expected ray distance ``sum w_i t_i`` (not divided by opacity);
        ``normals`` are world-space unit SDF gradients composited the same way (0 where empty).
        Random draws (jitter, importance samples, background colours, eikonal points) all come
        from ``generator``, so a seeded render is reproducible.
        """
        B, P = len(cameras), cameras.num_prompts
        origins, directions = camera_rays(cameras, height, width)
        if background_rgb is not None and background_rgb.shape != (B, 3):
            raise ValueError(
                f"background_rgb has shape {tuple(background_rgb.shape)}, expected ({B}, 3)"
            )
        augment = self.training and background_rgb is None and self.background_augmentation_prob > 0
        if augment:  # drawn first so the draw count does not depend on the chunking
            replace = _rand((B,), generator, directions) < self.background_augmentation_prob
            colours = _rand((B, 3), generator, directions)

        o = origins.reshape(P, -1, 3)  # the views of prompt p are cameras p*V .. p*V+V-1
        d = directions.reshape(P, -1, 3)
        R = o.shape[1]
        chunk = R if self.training and torch.is_grad_enabled() else max(1, self.chunk_rays // P)
        rays = _Rays.cat(
            [
                self._render_rays(
                    field,
                    o[:, s : s + chunk],
                    d[:, s : s + chunk],
                    generator,
                    compute_normals,
                    background_rgb is None,
                )
                for s in range(0, R, chunk)
            ]
        )

        def image(x: Tensor) -> Tensor:
            return x.reshape(B, height, width, x.shape[-1]).permute(0, 3, 1, 2)

        opacity = image(rays.opacity)
        if background_rgb is not None:
            background = background_rgb.to(opacity)[:, :, None, None]
        else:
            assert rays.background is not None
            background = image(rays.background)
            if augment:
                background = torch.where(
                    replace[:, None, None, None], colours[:, :, None, None], background
                )
        rgb = image(rays.rgb) + (1.0 - opacity) * background

        sdf_gradients = None
        if self.training and self.eikonal_points > 0:
            points = (2.0 * _rand((P, self.eikonal_points, 3), generator, d) - 1.0) * self.radius
            [(sdf, _)] = _query(field, _fd_points(points, self.finite_difference_eps))
            sdf_gradients = _fd_gradient(sdf, self.finite_difference_eps)
        return RenderOutput(
            rgb=rgb.contiguous(),
            opacity=opacity.contiguous(),
            depth=image(rays.depth).contiguous(),
            normals=None if rays.normals is None else image(rays.normals).contiguous(),
            sdf_gradients=sdf_gradients,
        )

    def _render_rays(
        self,
        field: Field,
        origins: Float[Tensor, "P R 3"],
        directions: Float[Tensor, "P R 3"],
        generator: torch.Generator | None,
        compute_normals: bool,
        with_background: bool,
    ) -> _Rays:
        P, R, _ = origins.shape
        S, K = self.num_samples_stratified, self.num_samples_importance
        near, far, _ = ray_box_intersection(origins, directions, self.radius, self.near_min)
        if self.training:
            offsets = _rand((P, R, S), generator, origins)
        else:
            offsets = torch.full((P, R, S), 0.5, dtype=origins.dtype, device=origins.device)
        bins = torch.arange(S, dtype=origins.dtype, device=origins.device)
        t = near[..., None] + (far - near)[..., None] * (bins + offsets) / S

        def at(t: Tensor) -> Tensor:
            return origins[..., None, :] + directions[..., None, :] * t[..., None]

        [(sdf, rgb)] = _query(field, at(t))
        if K > 0:
            with torch.no_grad():
                edges = interval_edges(t, near, far)
                weights = composite_weights(laplace_density(sdf.detach(), self.beta), edges)
                # Stratified quantiles (one per 1/K of the CDF): lower variance than i.i.d. ones.
                jitter = _rand((P, R, K), generator, origins) if self.training else 0.5
                u = (
                    (torch.arange(K, dtype=origins.dtype, device=origins.device) + jitter) / K
                ).expand(P, R, K)
                t_fine = sample_pdf(edges, weights, u)
            [(sdf_fine, rgb_fine)] = _query(field, at(t_fine))
            t, order = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1)
            sdf = torch.cat([sdf, sdf_fine], dim=-1).gather(-1, order)
            rgb = torch.cat([rgb, rgb_fine], dim=-2).gather(
                -2, order[..., None].expand(-1, -1, -1, 3)
            )

        weights = composite_weights(laplace_density(sdf, self.beta), interval_edges(t, near, far))
        normals = None
        if compute_normals:
            eps = self.finite_difference_eps
            [(sdf_probes, _)] = _query(field, _fd_points(at(t), eps))
            unit = nn.functional.normalize(_fd_gradient(sdf_probes, eps), dim=-1)
            normals = (weights[..., None] * unit).sum(dim=-2)
        return _Rays(
            rgb=(weights[..., None] * rgb).sum(dim=-2),
            opacity=weights.sum(dim=-1, keepdim=True),
            depth=(weights * t).sum(dim=-1, keepdim=True),
            normals=normals,
            background=self.background(directions) if with_background else None,
        )
