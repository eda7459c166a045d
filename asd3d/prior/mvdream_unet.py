"""MVDream's multi-view UNet, written for asd3d from the facts of the official release
(REFERENCE.md §2; bytedance/MVDream, ``MultiViewUNetModel`` with ``SpatialTransformer3D``).

It is the Stable Diffusion 2.1-base LDM UNet with two changes:

* every transformer's self-attention attends across the ``F`` views of a group: tokens are
  regrouped ``(b f) (h w) c -> b (f h w) c`` around ``attn1`` only; cross-attention to the text
  and the feed-forward stay per view;
* a camera MLP ``camera_dim -> 4 model_channels -> 4 model_channels`` (Linear, SiLU, Linear) is
  added to the timestep embedding; ``camera=None`` skips it, as the release does.

The views of a group are consecutive in the batch (``x`` is ``(B F) x C x h x w``, the layout of
``asd3d.types``). ``num_frames=1`` makes every image its own group, i.e. plain SD attention.

Submodule names reproduce the release's, so ``state_dict()`` keys equal the checkpoint's UNet keys
(``model.diffusion_model.`` stripped) and :func:`load_official_state_dict` loads
``sd-v2.1-base-4view.pt`` strictly. The full-size model has 690 tensors and 867,572,164
parameters (SD 2.1-base's 865,910,724 plus the camera MLP's 1,661,440).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

UNET_PREFIX = "model.diffusion_model."

# The UNet block of the release's `configs/sd-v2-base.yaml`, used for `sd-v2.1-base-4view`.
MVDREAM_SD21_BASE_4VIEW_CONFIG: dict = {
    "image_size": 32,  # unused by the network; 32^2 latents = 256^2 renders
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_checkpoint": False,
    "legacy": False,
    "camera_dim": 16,
}


def timestep_embedding(
    timesteps: Float[Tensor, "B"], dim: int, max_period: float = 10000.0
) -> Float[Tensor, "B dim"]:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    Cosine half first, as the release calls it (``repeat_only=False``); an odd ``dim`` is padded
    with a zero column. Computed in fp32 whatever the model's dtype.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _zeroed(module: nn.Module) -> nn.Module:
    """The release zero-initialises every residual branch's last layer (an untrained block is the
    identity); kept so a freshly built model behaves like the release's before loading."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNorm32(nn.GroupNorm):
    """32-group GroupNorm evaluated in fp32, as the release's ResBlocks and output head do.

    The affine parameters are upcast too, so the module also runs when the whole network has
    been cast to fp16 / bf16 (the release keeps fp32 weights and relies on autocast instead).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(32, channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """Conv residual block with the timestep(+camera) embedding added after the first conv."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Float[Tensor, "N C h w"], emb: Float[Tensor, "N E"]) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 conv (``conv_resample=True``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v (the release's ``CrossAttention``), through
    ``scaled_dot_product_attention`` (default scale ``dim_head^-0.5``, as the release's).

    The release can force q.k to fp32 under autocast (``ATTN_PRECISION``); no cast is made here:
    the release itself runs in fp32 (REFERENCE.md §2) and SDPA's half-precision kernels
    accumulate the softmax in fp32.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # Sequential only so the key is `to_out.0`, as in the checkpoint (index 1 was Dropout(0)).
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(
        self, x: Float[Tensor, "N Q C"], context: Float[Tensor, "N K D"] | None = None
    ) -> Float[Tensor, "N Q C"]:
        context = x if context is None else context

        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Gated GELU input projection of the feed-forward (``gated_ff=True`` in the release)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; ``net.{0,1,2}`` = proj, dropout, out as in the checkpoint."""

    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiViewTransformerBlock(nn.Module):
    """Pre-LN block: multi-view self-attention, per-view text cross-attention, GEGLU MLP."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: Float[Tensor, "BF L C"], context: Float[Tensor, "BF T D"], num_frames: int
    ) -> Float[Tensor, "BF L C"]:
        # Only self-attention sees the whole group: that is what makes the views consistent.
        grouped = x.reshape(x.shape[0] // num_frames, num_frames * x.shape[1], x.shape[2])
        grouped = self.attn1(self.norm1(grouped)) + grouped
        x = grouped.reshape(x.shape)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class MultiViewSpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over ``h w`` tokens, project out, residual.

    ``use_linear`` picks Linear projections on tokens (SD 2.x) over 1x1 convs on the image; the
    release builds ``proj_out`` as ``Linear(in_channels, inner)``, which only has the right shape
    because ``inner == in_channels`` for ``num_head_channels`` configs; this is enforced.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        if inner != channels:
            raise ValueError(f"heads x dim_head = {inner} must equal the channels ({channels})")
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            MultiViewTransformerBlock(inner, heads, dim_head, context_dim, dropout)
            for _ in range(depth)
        )
        self.proj_out = _zeroed(
            nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        )

    def forward(
        self, x: Float[Tensor, "BF C h w"], context: Float[Tensor, "BF T D"], num_frames: int
    ) -> Float[Tensor, "BF C h w"]:
        n, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, num_frames)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(n, -1, h, w)
        if not self.use_linear:
            tokens = self.proj_out(tokens)
        return tokens + x


class _Stage(nn.ModuleList):
    """One entry of ``input_blocks``/``output_blocks``/``middle_block``; routes each layer the
    inputs it takes (the release's ``TimestepEmbedSequential``)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, MultiViewSpatialTransformer):
                h = layer(h, context, num_frames)
            else:
                h = layer(h)
        return h


class MultiViewUNet(nn.Module):
    """MVDream's UNet, built from the release's config keys (:data:`MVDREAM_SD21_BASE_4VIEW_CONFIG`).

    Only the options that config uses are implemented: 2D, spatial transformers, conv
    resampling, no scale-shift norm, no class labels. Accepted without effect: ``image_size``
    (the network is fully convolutional), ``use_checkpoint`` (activation checkpointing is left to
    the caller) and ``legacy`` (with spatial transformers both settings give
    ``dim_head = channels // heads``). Exactly one of ``num_heads``/``num_head_channels`` is set.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int,
        channel_mult: Sequence[int],
        context_dim: int,
        num_head_channels: int = -1,
        num_heads: int = -1,
        transformer_depth: int = 1,
        use_linear_in_transformer: bool = False,
        camera_dim: int | None = None,
        dropout: float = 0.0,
        image_size: int | None = None,
        use_spatial_transformer: bool = True,
        use_checkpoint: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        if not use_spatial_transformer:
            raise ValueError(
                "only the spatial-transformer UNet (use_spatial_transformer=True) exists"
            )
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        self.model_channels = model_channels
        self.camera_dim = camera_dim
        emb_dim = 4 * model_channels

        def transformer(ch: int) -> MultiViewSpatialTransformer:
            heads = ch // num_head_channels if num_head_channels != -1 else num_heads
            return MultiViewSpatialTransformer(
                ch, heads, ch // heads, transformer_depth, context_dim,
                use_linear_in_transformer, dropout,
            )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if camera_dim is not None:
            self.camera_embed = nn.Sequential(
                nn.Linear(camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )

        # Encoder: per level `num_res_blocks` x (ResBlock [+ transformer]), then a downsample
        # except at the last level; the channel count of every stage output feeds a skip.
        self.input_blocks = nn.ModuleList(
            [_Stage([nn.Conv2d(in_channels, model_channels, 3, padding=1)])]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(_Stage(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Stage([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        # The middle transformer is present whatever attention_resolutions says.
        self.middle_block = _Stage(
            [
                ResBlock(ch, emb_dim, ch, dropout),
                transformer(ch),
                ResBlock(ch, emb_dim, ch, dropout),
            ]
        )

        # Decoder mirrors the encoder with one extra ResBlock per level (to consume the
        # downsample's skip) and concatenated skips.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = mult * model_channels
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, out_ch, dropout)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Stage(layers))

        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            _zeroed(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: Float[Tensor, "BF C h w"],
        timesteps: Float[Tensor, "BF"],
        *,
        context: Float[Tensor, "BF T D"],
        camera: Float[Tensor, "BF camera_dim"] | None = None,
        num_frames: int = 1,
    ) -> Float[Tensor, "BF C_out h w"]:
        """Predict the noise (eps) of ``x`` at integer ``timesteps`` for groups of ``num_frames``
        consecutive views. A 0-d ``timesteps`` is shared by the whole batch."""
        n = x.shape[0]
        if n % num_frames:
            raise ValueError(f"batch {n} is not a multiple of num_frames={num_frames}")
        dtype = next(self.parameters()).dtype
        timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if camera is not None:
            if self.camera_dim is None:
                raise ValueError("this UNet was built without camera_dim; pass camera=None")
            emb = emb + self.camera_embed(camera.to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for stage in self.input_blocks:
            h = stage(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.out(h).to(x.dtype)


def load_official_state_dict(
    module: MultiViewUNet, state_dict: Mapping[str, Tensor], assign: bool = False
) -> None:
    """Load the UNet weights of an MVDream LDM checkpoint (or of a bare UNet state dict).

    If any key starts with ``model.diffusion_model.``, those keys (prefix stripped) are the UNet's
    and all others (``first_stage_model.`` VAE, ``cond_stage_model.`` text encoder, schedule
    buffers such as ``betas``) are ignored; otherwise every key not under ``first_stage_model.``
    or ``cond_stage_model.`` is taken as a UNet key. The UNet keys must match exactly.
    ``assign=True`` makes the checkpoint's tensors the parameters (for a module built on the
    ``meta`` device: no random initialisation, no second copy of the weights).
    """
    if any(key.startswith(UNET_PREFIX) for key in state_dict):
        unet = {
            k[len(UNET_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)
        }
    else:
        other = ("first_stage_model.", "cond_stage_model.")
        unet = {k: v for k, v in state_dict.items() if not k.startswith(other)}
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(unet)), sorted(set(unet) - expected)
    if missing or unexpected:
        raise ValueError(
            f"not an MVDream UNet state dict for this config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    module.load_state_dict(unet, strict=True, assign=assign)
