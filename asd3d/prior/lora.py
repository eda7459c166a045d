"""Trainable, camera-conditioned copies of a frozen prior's noise prediction: VSD's ``eps_phi``.

Variational score distillation (ProlificDreamer, Wang et al. 2023; REFERENCE.md §1) compares the
frozen prior with a model ``eps_phi(x_t, t, y, pi)`` of the *current renders'* distribution, trained
on those renders. Two forms live here:

* :class:`UNetLoRA` for network priors (SD, MVDream): rank-``r`` LoRA layers (peft) injected into
  the attention projections of the prior's UNet, plus a camera MLP (flattened 16-d c2w -> time
  embedding width) whose output is added to the UNet's timestep embedding -- where diffusers adds
  a ``class_embedding`` (threestudio's ``stable_diffusion_vsd_guidance`` sets its
  ``TimestepEmbedding(16, 1280)`` there). Both act only on the rows selected with
  :meth:`UNetLoRA.active`; every other call of the UNet is exactly the frozen prior, so one batched
  UNet call can mix frozen and adapted rows.
* :class:`ResidualEpsilonNet` for priors without a network (the procedural prior's exact
  denoiser): a small conv net predicting a correction ``delta_phi`` added to the frozen
  conditional prediction, the same "frozen model + small trainable change" as LoRA.

Ownership: the injected layers sit inside the prior's UNet (which is outside the training
system's module tree, never checkpointed), and are *also* registered as submodules of the
adapter, which the distiller owns. So their weights are in the system's ``state_dict`` (under
``distiller.``), in DDP and in the optimiser, while the prior's own weights are in none of them.
Both output layers start at zero, so ``eps_phi`` starts as the frozen prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from asd3d.prior.mvdream_unet import timestep_embedding

#: Attention projections of diffusers' ``Attention`` and of MVDream's (same names, same layout).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
#: Where each UNet computes its timestep embedding: diffusers' ``UNet2DConditionModel``, MVDream.
TIME_EMBEDDING_NAMES = ("time_embedding", "time_embed")
CAMERA_DIM = 16  # flattened 4x4 camera-to-world matrix
_Layer = TypeVar("_Layer", nn.Linear, nn.Conv2d)


def _zero_init(layer: _Layer) -> _Layer:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class CameraEmbedding(nn.Module):
    """``Linear(16, D) -> SiLU -> Linear(D, D)`` of the flattened c2w (diffusers'
    ``TimestepEmbedding`` shape, as threestudio uses). The last layer starts at zero, so an
    untrained adapter adds nothing (threestudio initialises it at random)."""

    def __init__(self, dim: int, camera_dim: int = CAMERA_DIM) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(camera_dim, dim)
        self.linear_2 = _zero_init(nn.Linear(dim, dim))

    def forward(self, camera: Float[Tensor, "N 16"]) -> Float[Tensor, "N D"]:
        weight = self.linear_1.weight
        return self.linear_2(F.silu(self.linear_1(camera.to(weight.device, weight.dtype))))


def _find_time_embedding(network: nn.Module) -> tuple[nn.Module, int]:
    """The timestep-embedding module of ``network`` and its output width."""
    for name in TIME_EMBEDDING_NAMES:
        module = getattr(network, name, None)
        if isinstance(module, nn.Module):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears:
                return module, linears[-1].out_features
    raise ValueError(
        f"{type(network).__name__} has no timestep embedding named "
        f"{' or '.join(TIME_EMBEDDING_NAMES)}; VSD's camera embedding is added there"
    )


class UNetLoRA(nn.Module):
    """LoRA (peft) on a frozen UNet's attention projections + a camera embedding, active per row.

    Args:
        network: the prior's UNet (diffusers ``UNet2DConditionModel`` or
            :class:`asd3d.prior.mvdream_unet.MultiViewUNet`); modified in place.
        rank: LoRA rank ``r`` (4 in ProlificDreamer / threestudio).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / r`` (``alpha = r``: scale 1, as
            threestudio's ``LoRAAttnProcessor``).
        target_modules: module-name suffixes to adapt (peft's ``target_modules``).
        adapter_name: peft's name of the adapter inside the UNet.

    peft initialises ``A`` (Kaiming-uniform) and ``B = 0``, so the adapted UNet starts as the
    frozen one. Outside :meth:`active` the adapter's outputs are replaced by exact zeros (the
    LoRA layers stay enabled, so their ``requires_grad`` never changes under DDP).
    """

    def __init__(
        self,
        network: nn.Module,
        rank: int,
        alpha: int,
        target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
        adapter_name: str = "vsd",
    ) -> None:
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if rank < 1:
            raise ValueError(f"distiller.lora_rank={rank} must be >= 1 (ProlificDreamer uses 4)")
        if any(isinstance(m, LoraLayer) for m in network.modules()):
            raise ValueError(
                f"the prior's {type(network).__name__} already carries LoRA layers; "
                "build a fresh prior for each VSD distiller"
            )
        config = LoraConfig(r=int(rank), lora_alpha=int(alpha), target_modules=list(target_modules))
        try:
            inject_adapter_in_model(config, network, adapter_name=adapter_name)
        except ValueError as err:
            raise ValueError(
                f"distiller.lora_targets={list(target_modules)} match no layer of "
                f"{type(network).__name__} ({str(err).splitlines()[0][:120]}); "
                f"use attention projection names such as {list(ATTENTION_PROJECTIONS)}"
            ) from None
        # ModuleDict keys may not contain ".": the layer's path with "-" instead.
        self.layers = nn.ModuleDict()
        self._hooks = []
        for name, module in network.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                # fp32 whatever the UNet's dtype: peft casts the adapter to the base layer's
                # dtype, and Adam on fp16 weights loses small updates. peft casts the layer's
                # input to the adapter's dtype and the sum back to the UNet's.
                lora_a = module.lora_A[adapter_name].float()
                lora_b = module.lora_B[adapter_name].float()
                self.layers[name.replace(".", "-")] = nn.ModuleDict({"A": lora_a, "B": lora_b})
                self._hooks.append(lora_b.register_forward_hook(self._mask_update))
        time_embedding, dim = _find_time_embedding(network)
        self.camera_embedding = CameraEmbedding(dim)
        self._hooks.append(time_embedding.register_forward_hook(self._add_camera))
        self._rows: Bool[Tensor, "N"] | None = None
        self._camera: Float[Tensor, "N 16"] | None = None
        self._masks: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def active(self, rows: Bool[Tensor, "N"], camera: Float[Tensor, "N 16"]) -> Iterator[None]:
        """Within the block, UNet calls on ``N`` rows go through the adapter on ``rows`` (with
        the camera codes ``camera``; zeros = no camera, as CFG training drops it) and through
        the frozen UNet on the others."""
        if camera.shape != (rows.shape[0], CAMERA_DIM):
            raise ValueError(f"camera codes {tuple(camera.shape)} != ({rows.shape[0]}, 16)")
        self._rows, self._camera, self._masks = rows, camera, {}
        try:
            yield
        finally:
            self._rows, self._camera, self._masks = None, None, {}

    def _row_mask(self, batch: int, like: Tensor) -> Tensor:
        """The row mask shaped for a layer whose leading dimension is ``batch``: the rows
        themselves, or groups of consecutive rows (MVDream's multi-view self-attention folds the
        views of a group into one sequence; all rows of a group must agree)."""
        mask = self._masks.get(batch)
        if mask is None:
            rows = self._rows
            assert rows is not None
            if batch == rows.shape[0]:
                mask = rows
            elif rows.shape[0] % batch == 0:
                groups = rows.view(batch, -1)
                if not bool((groups == groups[:, :1]).all()):
                    raise ValueError("adapted and frozen rows are mixed inside a view group")
                mask = groups[:, 0]
            else:
                raise ValueError(f"a layer's batch {batch} does not divide {rows.shape[0]} rows")
            self._masks[batch] = mask
        return mask.to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def _mask_update(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        # torch.where, not a product: frozen rows get exact zeros even if the update overflowed.
        if self._rows is None:
            return torch.zeros_like(output)
        return torch.where(self._row_mask(output.shape[0], output), output, 0.0)

    def _add_camera(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if self._rows is None or self._camera is None:
            return None
        if output.shape[0] != self._rows.shape[0]:
            raise ValueError(f"timestep embedding of {output.shape[0]} rows != {len(self._rows)}")
        embedding = self.camera_embedding(self._camera)
        mask = self._row_mask(output.shape[0], output)
        return output + torch.where(mask, embedding.to(output.dtype), 0.0)


class ResidualEpsilonNet(nn.Module):
    """``delta_phi(x_t, eps_frozen, t, pi)``: the VSD model of a prior without a network is
    ``eps_phi = eps_frozen(x_t, t, y) + delta_phi`` (LoRA's "frozen + small change", in pixels).

    Three 3x3 convs over ``[x_t, eps_frozen]`` (the frozen conditional prediction carries the
    prompt), modulated (scale and shift) by an MLP of the timestep's sinusoidal embedding plus an
    MLP of the flattened c2w. The output conv starts at zero.

    Args:
        channels: image channels of the prior (3 for the procedural prior).
        hidden: conv width.
        embedding_dim: width of the timestep / camera embedding.
    """

    def __init__(self, channels: int = 3, hidden: int = 32, embedding_dim: int = 64) -> None:
        super().__init__()
        if channels < 1 or hidden < 1 or embedding_dim < 2:
            raise ValueError(
                f"distiller.epsnet_channels={channels} / epsnet_hidden={hidden} / "
                f"epsnet_embedding_dim={embedding_dim}: need >= 1, >= 1 and >= 2"
            )
        self.embedding_dim = embedding_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim),
            nn.SiLU(),
            nn.Linear(embedding_dim, embedding_dim),
        )
        self.camera_embedding = CameraEmbedding(embedding_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * hidden))
        self.conv_in = nn.Conv2d(2 * channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = _zero_init(nn.Conv2d(hidden, channels, 3, padding=1))
        self.norm = nn.GroupNorm(min(8, hidden), hidden)

    def forward(
        self,
        x_t: Float[Tensor, "N C h w"],
        eps_frozen: Float[Tensor, "N C h w"],
        t: Int[Tensor, "N"],
        camera: Float[Tensor, "N 16"],
    ) -> Float[Tensor, "N C h w"]:
        emb = self.time_mlp(timestep_embedding(t, self.embedding_dim))
        emb = emb + self.camera_embedding(camera)
        scale, shift = self.modulation(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv_in(torch.cat([x_t, eps_frozen], dim=1).float())
        h = self.norm(h) * (1.0 + scale) + shift
        h = self.conv_mid(F.silu(h))
        return self.conv_out(F.silu(h))
