"""Variational Score Distillation (ProlificDreamer, Wang et al. 2023; REFERENCE.md §1).

VSD replaces SDS's injected noise by the prediction of a model ``eps_phi`` of the distribution of
the generator's *current* renders, trained alongside it:

    grad = w(t) (eps_cfg(x_t, t, y) - eps_phi(x_t, t, y, pi))      (frozen prior: CFG 7.5; phi: 1)
    L_phi = || eps_phi(x_t', t', y, pi') - eps' ||^2  on the detached latents, t' ~ U{0..T-1},
            pi' = the camera, zeroed with probability 0.1 (so phi also learns its camera-free CFG)

``eps_phi`` is a rank-4 LoRA on the prior's UNet with the flattened c2w added to its timestep
embedding (:class:`asd3d.prior.lora.UNetLoRA`), or, for a prior without a network (the procedural
one), a small residual epsilon-net (:class:`asd3d.prior.lora.ResidualEpsilonNet`).

**One step, not alternating steps.** ``L_phi`` is returned as ``DistillOutput.aux_loss`` and
summed into the step's loss (threestudio's and the ScaleDreamer release's VSD baseline do the
same, ``lambda_lora = 1``). The two gradients touch disjoint parameters -- the surrogate's reaches
the generator only (``eps_phi`` is evaluated without autograd), ``L_phi``'s reaches ``phi`` only
(the latents are detached) -- so one backward and one optimiser step give exactly the
alternating update "generator step with ``phi_k``, then ``phi`` step on the same renders", with
one render and one DDP all-reduce instead of two. (Global gradient-norm clipping would couple
them; the release uses none.)

**Prior calls per step: two.** (1) One no-grad batched call with the frozen rows (cond, uncond,
Perp-Neg's negatives) *and* ``eps_phi``'s rows -- the adapter acts only on its own rows, so
frozen and adapted rows share one UNet call (threestudio makes two). (2) ``phi``'s training
call, with autograd through the LoRA layers. The procedural prior's residual net needs no
gradient through the prior, so its call (2) is a no-grad prior call plus the tiny net.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from asd3d.distiller import math
from asd3d.distiller.base import (
    Distiller,
    PredictFn,
    Query,
    combine_guidance,
    guidance_queries,
    predict_batched,
)
from asd3d.distiller.timesteps import sample_timesteps
from asd3d.prior.base import Prior
from asd3d.prior.lora import CAMERA_DIM, ResidualEpsilonNet, UNetLoRA
from asd3d.prior.schedule import gather_abar
from asd3d.types import Condition, ConditionPair, DistillOutput


def vsd_gradient(
    eps_guided: Float[Tensor, "B C h w"],
    eps_particle: Float[Tensor, "B C h w"],
    weight: Float[Tensor, "B 1 1 1"],
) -> Float[Tensor, "B C h w"]:
    """VSD (ProlificDreamer's update; REFERENCE.md §1): ``w(t) (eps_cfg(x_t, t) - eps_phi(x_t, t))``,
    both on the same ``x_t``; ``eps_phi`` is the camera-conditioned model of the current renders."""
    return weight * (eps_guided - eps_particle)


class LoRAParticle(nn.Module):
    """``eps_phi`` of a network prior: the prior's own UNet through a :class:`UNetLoRA`.

    The LoRA branch sees the prompt without view-dependent suffixes (the camera is its input),
    as threestudio's ``stable_diffusion_vsd_guidance``; the frozen branch keeps the prior's
    (possibly view-dependent) conditioning.
    """

    def __init__(
        self, prior: Prior, network: nn.Module, rank: int, alpha: int, targets: Sequence[str]
    ) -> None:
        super().__init__()
        predict_with_grad = getattr(prior, "predict_eps_with_grad", None)
        if predict_with_grad is None:
            raise ValueError(
                f"distiller=vsd needs {type(prior).__name__}.predict_eps_with_grad (a UNet call "
                "with autograd on) to train its LoRA; use a prior that provides it"
            )
        self.adapter = UNetLoRA(network, rank=rank, alpha=alpha, target_modules=targets)
        # Bound methods, not modules: the prior stays out of the distiller's module tree.
        self._predict_with_grad = predict_with_grad
        self._encode_text = prior.encode_text

    def particle_condition(self, condition: Condition) -> Condition:
        """``condition`` with the bare prompts' tokens (``texts`` are the prompts without view
        suffixes; the text encoder's cache makes this cheap)."""
        if condition.tokens is None:
            return condition
        tokens = self._encode_text(list(condition.texts)).tokens
        return dataclasses.replace(condition, tokens=tokens.to(condition.tokens))

    def predict(
        self,
        predict: PredictFn,
        frozen: Sequence[Query],
        particle: Sequence[Query],
        cameras: Sequence[Float[Tensor, "B 16"]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Frozen answers to ``frozen`` and ``eps_phi``'s to ``particle``: ONE prior call."""
        rows = torch.cat(
            [torch.zeros(len(q.t), dtype=torch.bool) for q in frozen]
            + [torch.ones(len(q.t), dtype=torch.bool) for q in particle]
        ).to(cameras[0].device)
        no_camera = [cameras[0].new_zeros(len(q.t), CAMERA_DIM) for q in frozen]
        camera = torch.cat([*no_camera, *cameras])
        with self.adapter.active(rows, camera):
            answers = predict_batched(predict, [*frozen, *particle])
        return answers[: len(frozen)], answers[len(frozen) :]

    def eps(
        self,
        predict: PredictFn,
        x_t: Float[Tensor, "N C h w"],
        t: Int[Tensor, "N"],
        condition: Condition,
        camera: Float[Tensor, "N 16"],
    ) -> Float[Tensor, "N C h w"]:
        """``eps_phi`` with autograd through the LoRA and camera embedding (for ``L_phi``)."""
        rows = torch.ones(len(t), dtype=torch.bool, device=camera.device)
        with self.adapter.active(rows, camera):
            return self._predict_with_grad(x_t, t, condition)


class ResidualParticle(nn.Module):
    """``eps_phi = eps_frozen + delta_phi`` for a prior without a network (procedural)."""

    def __init__(self, channels: int, hidden: int, embedding_dim: int) -> None:
        super().__init__()
        self.net = ResidualEpsilonNet(channels, hidden=hidden, embedding_dim=embedding_dim)

    def particle_condition(self, condition: Condition) -> Condition:
        return condition

    def predict(
        self,
        predict: PredictFn,
        frozen: Sequence[Query],
        particle: Sequence[Query],
        cameras: Sequence[Float[Tensor, "B 16"]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Frozen answers to ``frozen`` and to ``particle`` (ONE prior call), then ``+ delta``."""
        answers = predict_batched(predict, [*frozen, *particle])
        with torch.no_grad():
            eps_phi = [
                base + self.net(q.x_t, base, q.t, camera)
                for q, base, camera in zip(particle, answers[len(frozen) :], cameras)
            ]
        return answers[: len(frozen)], eps_phi

    def eps(
        self,
        predict: PredictFn,
        x_t: Float[Tensor, "N C h w"],
        t: Int[Tensor, "N"],
        condition: Condition,
        camera: Float[Tensor, "N 16"],
    ) -> Float[Tensor, "N C h w"]:
        """``eps_phi`` with autograd through ``delta_phi`` (the frozen part has none)."""
        base = predict(x_t, t, condition).detach()
        return base + self.net(x_t, base, t, camera)


class VSDDistiller(Distiller):
    """``grad = w(t) (eps_cfg(x_t, t) - eps_phi(x_t, t, pi))`` plus ``eps_phi``'s own training.

    Args:
        guidance_scale: CFG of the frozen prior (7.5 in ProlificDreamer / the release baseline).
        particle_guidance_scale: CFG of ``eps_phi`` between the prompt with camera and the
            negative prompt without camera (threestudio's ``guidance_scale_lora``; 1 = the
            conditional prediction only, and no extra rows).
        lr: learning rate of ``phi``'s optimiser group (1e-4 in threestudio and the release).
        lora_rank, lora_alpha, lora_targets: the LoRA of network priors (see
            :class:`asd3d.prior.lora.UNetLoRA`).
        camera_dropout: probability that a view's camera code is zeroed in ``L_phi`` (0.1;
            threestudio's ``lora_cfg_training``; drawn per view group, threestudio per batch).
        particle_timestep_samples: copies of the latents in ``L_phi``, each with its own
            ``t'`` and noise (threestudio's ``lora_n_timestamp_samples``, 1).
        epsnet_channels, epsnet_hidden, epsnet_embedding_dim: image channels, conv width and
            embedding width of the residual epsilon-net of network-free priors.
    """

    def __init__(
        self,
        guidance_scale: float,
        lr: float,
        particle_guidance_scale: float = 1.0,
        lora_rank: int = 4,
        lora_alpha: int = 4,
        lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        camera_dropout: float = 0.1,
        particle_timestep_samples: int = 1,
        epsnet_channels: int = 3,
        epsnet_hidden: int = 32,
        epsnet_embedding_dim: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(camera_dropout) <= 1.0:
            raise ValueError(
                f"distiller.camera_dropout={camera_dropout} is outside [0, 1]; the release uses 0.1"
            )
        if int(particle_timestep_samples) < 1:
            raise ValueError(
                f"distiller.particle_timestep_samples={particle_timestep_samples} must be >= 1"
            )
        if float(lr) <= 0:
            raise ValueError(f"distiller.lr={lr} must be > 0 (the release uses 1e-4)")
        self.guidance_scale = float(guidance_scale)
        self.particle_guidance_scale = float(particle_guidance_scale)
        self.lr = float(lr)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = int(lora_alpha)
        self.lora_targets = tuple(lora_targets)
        self.camera_dropout = float(camera_dropout)
        self.particle_timestep_samples = int(particle_timestep_samples)
        self.epsnet_channels = int(epsnet_channels)
        self.epsnet_hidden = int(epsnet_hidden)
        self.epsnet_embedding_dim = int(epsnet_embedding_dim)
        self.particle: LoRAParticle | ResidualParticle | None = None

    # ----------------------------------------------------------------------------- wiring
    def attach_prior(self, prior: Prior) -> None:
        """Build ``eps_phi`` on ``prior``: LoRA if it has a ``unet``, else the residual net."""
        if self.particle is not None:
            raise ValueError("this VSD distiller is already attached to a prior")
        network = getattr(prior, "unet", None)
        if isinstance(network, nn.Module):
            self.particle = LoRAParticle(
                prior, network, self.lora_rank, self.lora_alpha, self.lora_targets
            )
        else:
            self.particle = ResidualParticle(
                self.epsnet_channels, self.epsnet_hidden, self.epsnet_embedding_dim
            )

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return [{"params": self._trainable(), "lr": self.lr, "name": "distiller"}]

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self._require_particle().parameters() if p.requires_grad]

    def _require_particle(self) -> LoRAParticle | ResidualParticle:
        if self.particle is None:
            raise RuntimeError("VSDDistiller.attach_prior(prior) must be called before use")
        return self.particle

    # ----------------------------------------------------------------------------- the step
    def forward(
        self,
        z: Float[Tensor, "B C h w"],
        conditions: ConditionPair,
        predict: PredictFn,
        alphas_cumprod: Float[Tensor, "T"],
        fraction: float,
        group_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """The VSD surrogate (base class) plus ``L_phi`` on the detached latents."""
        out = super().forward(
            z, conditions, predict, alphas_cumprod, fraction, group_size, generator
        )
        aux = self.particle_loss(
            z.detach(), conditions.positive, predict, alphas_cumprod, group_size, generator
        )
        return dataclasses.replace(out, aux_loss=aux)

    def gradient(
        self, z, t, eps, conditions, predict, alphas_cumprod, t_min, group_size, generator
    ):
        particle = self._require_particle()
        x_t = math.add_noise(z, eps, gather_abar(alphas_cumprod, t))
        camera = conditions.positive.cameras.flat_matrix().to(z)
        queries = [Query(x_t, t, particle.particle_condition(conditions.positive))]
        cameras = [camera]
        if self.particle_guidance_scale != 1.0:
            queries.append(Query(x_t, t, conditions.negative))
            cameras.append(torch.zeros_like(camera))
        frozen, eps_phi = particle.predict(
            predict, guidance_queries(x_t, t, conditions), queries, cameras
        )
        eps_cond, eps_uncond = combine_guidance(frozen, conditions)
        guided = math.classifier_free_guidance(eps_cond, eps_uncond, self.guidance_scale)
        if self.particle_guidance_scale != 1.0:
            eps_particle = math.classifier_free_guidance(
                eps_phi[0], eps_phi[1], self.particle_guidance_scale
            )
        else:
            eps_particle = eps_phi[0]
        return vsd_gradient(guided, eps_particle, self.weight(alphas_cumprod, t)), None

    def particle_loss(
        self,
        z: Float[Tensor, "B C h w"],
        condition: Condition,
        predict: PredictFn,
        alphas_cumprod: Float[Tensor, "T"],
        group_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, ""]:
        """``L_phi``: noise-prediction MSE of ``eps_phi`` at ``t' ~ U{0..T-1}`` (one per view
        group) on ``z`` (detached), cameras dropped per group with ``camera_dropout``."""
        particle = self._require_particle()
        copies = self.particle_timestep_samples
        z = z.detach().repeat(copies, 1, 1, 1)
        condition = Condition.concat([particle.particle_condition(condition)] * copies)
        groups = z.shape[0] // group_size
        t = sample_timesteps(
            groups, group_size, 0, alphas_cumprod.shape[0] - 1, generator, z.device
        )
        noise = _randn(z.shape, z, generator)
        kept_groups = _rand(groups, z, generator) >= self.camera_dropout
        keep: Bool[Tensor, "N"] = kept_groups.repeat_interleave(group_size)
        camera = condition.cameras.flat_matrix().to(z) * keep[:, None]
        x_t = math.add_noise(z, noise, gather_abar(alphas_cumprod, t))
        prediction = particle.eps(predict, x_t, t, condition, camera)
        return F.mse_loss(prediction.float(), noise.float())


def _randn(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def _rand(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device).to(like.device)
