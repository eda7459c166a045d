"""What every volume renderer of asd3d shares: rays, samples, compositing, chunking, background.

A renderer subclass only says how the field's scalar output becomes a density
(:meth:`VolumeRenderer.density`: VolSDF's Laplace CDF of the SDF, NeRF's activation of the raw
density) and which way its gradient points outward (:attr:`VolumeRenderer.normal_sign`).

Quadrature of the volume-rendering integral: sample ``i`` owns the interval between the
midpoints to its neighbours (``delta_i``), ``T_i = exp(-sum_{j<i} sigma_j delta_j)`` and weight
``w_i = T_i - T_{i+1}``; colour ``sum w_i c_i`` is composited over the background.

Rays are clipped to the scene box ``[-radius, radius]^3`` instead of a fixed far plane, which the
release used and which cannot reach the object from MVDream's distant narrow-fov cameras (§5).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from asd3d.cameras import camera_rays
from asd3d.types import Cameras, Field, RenderOutput

Shading = Literal["none", "diffuse"]

OPTICAL_DEPTH_CLAMP = 60.0


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


def random_uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """``U[0, 1)`` drawn where the generator lives (a CPU generator may drive a CUDA render)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def query_field(field: Field, *points: Tensor) -> list[tuple[Tensor, Tensor]]:
    """One field call for several point sets ``P x ... x 3``; returns ``(scalar ..., rgb ... x 3)``."""
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


def finite_difference_points(x: Float[Tensor, "*N 3"], eps: float) -> Float[Tensor, "*N 6 3"]:
    """The 6 central-difference probes ``x +- eps e_d`` of every point."""
    # +e_d, -e_d per axis, built on x's device (a constant copied from the host would sync).
    eye = torch.eye(3, dtype=x.dtype, device=x.device) * eps
    offsets = torch.stack([eye, -eye], dim=1).reshape(6, 3)
    return x[..., None, :] + offsets


def finite_difference_gradient(values: Float[Tensor, "*N 6"], eps: float) -> Float[Tensor, "*N 3"]:
    """Central-difference gradient from the values at :func:`finite_difference_points`."""
    return (values[..., 0::2] - values[..., 1::2]) / (2.0 * eps)


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


class VolumeRenderer(nn.Module, abc.ABC):
    """Volume-renders a :class:`~asd3d.types.Field` whose scalar output defines a density.

    Per ray: stratified samples in the ray's span inside the scene box, then importance samples
    from the coarse weights' CDF (no gradient through the sampling), union sorted, composited.
    The field is called with all views of a prompt at once (``P x (V R S) x 3``): once for the
    coarse samples, once for the importance samples, and, only when asked, once for the
    finite-difference probes of the normals (and subclasses' extra probes). Without gradients
    (or in eval mode) rays are processed in chunks of ``chunk_rays`` (split across the rays of
    each prompt group) so 120 views at 512² fit in bounded memory.

    A text-conditioned background (``background.text_conditioned``) is called with the field's
    ``text_embedding`` (``P x D``).

    Args:
        background: module mapping unit directions ``(*, 3)`` to colours ``(*, 3)`` in [0, 1].
        radius: half-size of the axis-aligned scene box rays are clipped to.
        num_samples_stratified: stratified samples per ray (jittered in training, bin centres in
            eval).
        num_samples_importance: extra samples per ray drawn from the coarse weights (0: none).
        near_min: smallest distance from the camera at which a ray starts.
        background_augmentation_prob: in training, probability per image of replacing the
            background by a random solid colour.
        chunk_rays: rays per chunk when rendering without gradients.
        finite_difference_eps: step of the central differences for normals.
        shading: ``none`` (colour is the field's colour) or ``diffuse``: the composited colour is
            lit by a headlight, ``c (a + (1 - a) max(0, n . -d))`` with the composited unit
            normal ``n`` (normals are then always computed).
        shading_ambient: ambient term ``a`` of the diffuse shading.
    """

    #: +1 when the gradient of the field's scalar points out of the surface (an SDF), -1 when
    #: it points in (a density).
    normal_sign: ClassVar[float]

    def __init__(
        self,
        background: nn.Module,
        radius: float,
        num_samples_stratified: int,
        num_samples_importance: int,
        near_min: float = 0.05,
        background_augmentation_prob: float = 0.0,
        chunk_rays: int = 65536,
        finite_difference_eps: float = 1e-2,
        shading: Shading = "none",
        shading_ambient: float = 0.3,
    ) -> None:
        super().__init__()
        checks = {
            "radius": radius > 0,
            "num_samples_stratified": num_samples_stratified >= 1,
            "num_samples_importance": num_samples_importance >= 0,
            "near_min": near_min >= 0,
            "background_augmentation_prob": 0.0 <= background_augmentation_prob <= 1.0,
            "chunk_rays": chunk_rays >= 1,
            "finite_difference_eps": finite_difference_eps > 0,
            "shading_ambient": 0.0 <= shading_ambient <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={locals()[name]} is out of range")
        if shading not in ("none", "diffuse"):
            raise ValueError(f"shading={shading!r} is not one of none, diffuse")
        self.background = background
        self.radius = float(radius)
        self.num_samples_stratified = int(num_samples_stratified)
        self.num_samples_importance = int(num_samples_importance)
        self.near_min = float(near_min)
        self.background_augmentation_prob = float(background_augmentation_prob)
        self.chunk_rays = int(chunk_rays)
        self.finite_difference_eps = float(finite_difference_eps)
        self.shading = shading
        self.shading_ambient = float(shading_ambient)

    @abc.abstractmethod
    def density(self, values: Float[Tensor, "*N"]) -> Float[Tensor, "*N"]:
        """Density ``sigma >= 0`` from the field's scalar output (``FieldOutput.sdf``)."""

    def extra_outputs(
        self, field: Field, num_prompts: int, like: Tensor, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Additional :class:`RenderOutput` fields of a training render (e.g. SDF gradients)."""
        return {}

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, samples={self.num_samples_stratified}"
            f"+{self.num_samples_importance}, near_min={self.near_min}, "
            f"bg_aug={self.background_augmentation_prob}, shading={self.shading}"
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
        ``normals`` are world-space outward unit gradients composited the same way (0 where
        empty). Random draws (jitter, importance samples, background colours, subclass probes)
        all come from ``generator``, so a seeded render is reproducible.
        """
        B, P = len(cameras), cameras.num_prompts
        origins, directions = camera_rays(cameras, height, width)
        if background_rgb is not None and background_rgb.shape != (B, 3):
            raise ValueError(
                f"background_rgb has shape {tuple(background_rgb.shape)}, expected ({B}, 3)"
            )
        augment = self.training and background_rgb is None and self.background_augmentation_prob > 0
        if augment:  # drawn first so the draw count does not depend on the chunking
            replace = (
                random_uniform((B,), generator, directions) < self.background_augmentation_prob
            )
            colours = random_uniform((B, 3), generator, directions)
        text_embedding = self._background_condition(field, background_rgb is None)

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
                    compute_normals or self.shading == "diffuse",
                    background_rgb is None,
                    text_embedding,
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
        extra = self.extra_outputs(field, P, d, generator) if self.training else {}
        return RenderOutput(
            rgb=rgb.contiguous(),
            opacity=opacity.contiguous(),
            depth=image(rays.depth).contiguous(),
            normals=None if rays.normals is None else image(rays.normals).contiguous(),
            **extra,
        )

    def _background_condition(self, field: Field, needed: bool) -> Tensor | None:
        if not (needed and getattr(self.background, "text_conditioned", False)):
            return None
        text = getattr(field, "text_embedding", None)
        if text is None:
            raise ValueError(
                f"{type(self.background).__name__} is text-conditioned but the field of "
                f"{type(field).__name__} carries no text_embedding; use a text-conditioned "
                "generator (generator=hyper_ingp) or an unconditional background"
            )
        return text

    def _render_rays(
        self,
        field: Field,
        origins: Float[Tensor, "P R 3"],
        directions: Float[Tensor, "P R 3"],
        generator: torch.Generator | None,
        compute_normals: bool,
        with_background: bool,
        text_embedding: Tensor | None,
    ) -> _Rays:
        P, R, _ = origins.shape
        S, K = self.num_samples_stratified, self.num_samples_importance
        near, far, _ = ray_box_intersection(origins, directions, self.radius, self.near_min)
        if self.training:
            offsets = random_uniform((P, R, S), generator, origins)
        else:
            offsets = torch.full((P, R, S), 0.5, dtype=origins.dtype, device=origins.device)
        bins = torch.arange(S, dtype=origins.dtype, device=origins.device)
        t = near[..., None] + (far - near)[..., None] * (bins + offsets) / S

        def at(t: Tensor) -> Tensor:
            return origins[..., None, :] + directions[..., None, :] * t[..., None]

        [(values, rgb)] = query_field(field, at(t))
        if K > 0:
            with torch.no_grad():
                edges = interval_edges(t, near, far)
                weights = composite_weights(self.density(values.detach()), edges)
                # Stratified quantiles (one per 1/K of the CDF): lower variance than i.i.d. ones.
                jitter = random_uniform((P, R, K), generator, origins) if self.training else 0.5
                u = (
                    (torch.arange(K, dtype=origins.dtype, device=origins.device) + jitter) / K
                ).expand(P, R, K)
                t_fine = sample_pdf(edges, weights, u)
            [(values_fine, rgb_fine)] = query_field(field, at(t_fine))
            t, order = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1)
            values = torch.cat([values, values_fine], dim=-1).gather(-1, order)
            rgb = torch.cat([rgb, rgb_fine], dim=-2).gather(
                -2, order[..., None].expand(-1, -1, -1, 3)
            )

        weights = composite_weights(self.density(values), interval_edges(t, near, far))
        colour = (weights[..., None] * rgb).sum(dim=-2)
        normals = None
        if compute_normals:
            eps = self.finite_difference_eps
            [(probes, _)] = query_field(field, finite_difference_points(at(t), eps))
            gradient = self.normal_sign * finite_difference_gradient(probes, eps)
            unit = nn.functional.normalize(gradient, dim=-1)
            normals = (weights[..., None] * unit).sum(dim=-2)
            if self.shading == "diffuse":
                facing = (nn.functional.normalize(normals, dim=-1) * -directions).sum(-1)
                light = self.shading_ambient + (1.0 - self.shading_ambient) * facing.clamp_min(0)
                colour = colour * light[..., None]
        background = None
        if with_background:
            background = (
                self.background(directions, text_embedding)
                if text_embedding is not None
                else self.background(directions)
            )
        return _Rays(
            rgb=colour,
            opacity=weights.sum(dim=-1, keepdim=True),
            depth=(weights * t).sum(dim=-1, keepdim=True),
            normals=normals,
            background=background,
        )
