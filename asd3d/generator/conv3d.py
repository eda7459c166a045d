"""3DConv-net: a text-conditioned StyleGAN2 synthesis network in 3D (ScaleDreamer, Sec. 4).

Follows the authors' release (``custom/amortized/extern/stylegan_3dconv_modules.py``, itself
adapted from CC3D), re-written here:

* **Mapping.** ``z`` (``z_dim``) is normalised to unit second moment, goes through
  ``mapping_layers`` fully-connected lrelu layers to ``w_dim``, is concatenated *after* them with
  the pooled text embedding, and one linear FC gives ``w``. The same ``w`` modulates every layer
  (the release broadcasts one ``w`` to all ``num_ws`` slots and has no truncation).
  Fully-connected layers use StyleGAN's equalised learning rate (weights stored ``~N(0, 1)``,
  scaled by ``1/sqrt(fan_in)`` at run time); the release uses learning-rate multiplier 1 in the
  mapping network when it is text-conditioned.
* **Synthesis.** A learned ``4^3`` constant, then one block per resolution up to
  ``output_resolution``. A layer is a modulated ``3^3`` conv with weight demodulation
  (``rsqrt(sum w^2 + 1e-8)``) -> trilinear x2 upsample (``align_corners=True``; first conv of a
  block only, so the conv runs at the lower resolution) -> per-voxel noise -> bias ->
  ``lrelu(0.2) * sqrt(2)`` -> clamp to ``+-256``. A block is ``conv0`` (upsampling) -> learned 3D
  bias tensor (resolutions <= ``bias_max_resolution``) -> ``conv1`` -> ``ToRGB``; the ``ToRGB``
  outputs (1x1x1 modulated conv without demodulation, ``feature_dim`` channels) are summed
  across resolutions with trilinear x2 upsampling (StyleGAN2 skip architecture).
* **Decoding.** The ``P x feature_dim x R^3`` volume is sampled trilinearly at the query points
  (box ``[-radius, radius]^3`` mapped to ``[-1, 1]^3``, ``align_corners=False``, zeros outside)
  and decoded by bias-free MLPs into SDF (+ sphere bias) and colour (sigmoid).

Per-voxel noise strengths start at 0 (so noise matters only once they are trained). The
release's volume lookup is only correct for one prompt per call; :func:`sample_volume` is
correct for any ``P`` and equal to it at ``P = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from asd3d.generator.base import BiasFreeMLP, DecodedField, Decoder, Generator, TextInput
from asd3d.types import PromptBatch

NoiseMode = Literal["random", "const", "off"]
ZMode = Literal["random", "zero"]

_LRELU_GAIN = math.sqrt(2.0)
_CLAMP = 256.0


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal draw from ``generator`` (on the generator's device), moved next to ``like``."""
    device = generator.device if generator is not None else like.device
    out = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def normalize_2nd_moment(x: Float[Tensor, "P C"], eps: float = 1e-8) -> Float[Tensor, "P C"]:
    """Scale each row to unit mean square (StyleGAN's input normalisation of ``z``)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualizedLinear(nn.Module):
    """Fully-connected layer with equalised learning rate, optional ``lrelu * sqrt(2)``."""

    def __init__(
        self, in_features: int, out_features: int, lrelu: bool = False, bias_init: float = 0.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = 1.0 / math.sqrt(in_features)
        self.lrelu = lrelu

    def forward(self, x: Float[Tensor, "P Din"]) -> Float[Tensor, "P Dout"]:
        x = torch.addmm(self.bias.unsqueeze(0), x, (self.weight * self.weight_gain).t())
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.lrelu else x


def modulated_conv3d(
    x: Float[Tensor, "P Ci D H W"],
    weight: Float[Tensor, "Co Ci k k k"],
    styles: Float[Tensor, "P Ci"],
    demodulate: bool,
) -> Float[Tensor, "P Co D H W"]:
    """StyleGAN2 modulated convolution (zero padding ``k // 2``).

    Computed as scale-input -> shared conv -> scale-output, which equals convolving with the
    per-sample weight ``w * s`` (demodulated by ``rsqrt(sum (w s)^2 + 1e-8)``) but runs as one
    ordinary batched conv instead of a grouped one.
    """
    x = x * styles[:, :, None, None, None]
    if weight.shape[-1] == 1:  # ToRGB: a channel matmul (CPU conv3d takes a slow path for 1^3)
        x = torch.einsum("pidhw,oi->podhw", x, weight[:, :, 0, 0, 0])
    else:
        x = F.conv3d(x, weight, padding=weight.shape[-1] // 2)
    if demodulate:
        # sum over (in, k, k, k) of (w_oi s_i)^2 = sum_i s_i^2 * sum_k w_oik^2
        dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3, 4)).t() + 1e-8).rsqrt()
        x = x * dcoefs[:, :, None, None, None]
    return x


def upsample2x(x: Float[Tensor, "P C R R R"]) -> Float[Tensor, "P C 2R 2R 2R"]:
    """Trilinear x2 upsampling with ``align_corners=True`` (as in the release)."""
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)


class SynthesisLayer(nn.Module):
    """Modulated 3^3 conv -> (x2 upsample) -> noise -> bias -> lrelu * sqrt(2) -> clamp."""

    noise_const: Tensor

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, upsample: bool
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.upsample = upsample
        # Styles start at 1 (bias_init=1) so the untrained network is an ordinary conv net.
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(
        self,
        x: Float[Tensor, "P Ci r r r"],
        w: Float[Tensor, "P W"],
        noise_mode: NoiseMode,
        generator: torch.Generator | None,
    ) -> Float[Tensor, "P Co R R R"]:
        x = modulated_conv3d(x, self.weight, self.affine(w), demodulate=True)
        if self.upsample:
            x = upsample2x(x)
        r = self.resolution
        if noise_mode == "random":
            # One noise value per voxel, shared by all channels, fresh for every prompt and call.
            x = x + _randn((x.shape[0], 1, r, r, r), generator, x) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        else:
            # "off": no noise, but the strength stays in the graph (with zero gradient) so DDP
            # does not fail on an unused parameter and checkpoints keep the release's keys.
            x = x + 0.0 * self.noise_strength
        x = F.leaky_relu(x + self.bias[None, :, None, None, None], 0.2)
        return torch.clamp(x * _LRELU_GAIN, -_CLAMP, _CLAMP)


class ToRGBLayer(nn.Module):
    """1x1x1 modulated conv without demodulation, to the ``feature_dim`` output channels."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        # Without demodulation the fan-in scaling has to be applied to the styles.
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(
        self, x: Float[Tensor, "P Ci R R R"], w: Float[Tensor, "P W"]
    ) -> Float[Tensor, "P Co R R R"]:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv3d(x, self.weight, styles, demodulate=False)
        return x + self.bias[None, :, None, None, None]


class SynthesisPrologue(nn.Module):
    """The 4^3 block: learned constant -> conv1 -> ToRGB (no bias tensor: it is a constant)."""

    def __init__(self, channels: int, w_dim: int, resolution: int, out_channels: int) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.randn(channels, resolution, resolution, resolution))
        self.conv1 = SynthesisLayer(channels, channels, w_dim, resolution, upsample=False)
        self.torgb = ToRGBLayer(channels, out_channels, w_dim)

    def forward(
        self, w: Tensor, noise_mode: NoiseMode, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        x = self.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1, -1)
        x = self.conv1(x, w, noise_mode, generator)
        return x, self.torgb(x, w)


class SynthesisBlock(nn.Module):
    """conv0 (x2 up) -> learned 3D bias -> conv1 -> ToRGB, added to the upsampled skip output."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        w_dim: int,
        resolution: int,
        out_channels: int,
        use_bias_tensor: bool,
    ) -> None:
        super().__init__()
        self.conv0 = SynthesisLayer(in_channels, channels, w_dim, resolution, upsample=True)
        self.conv1 = SynthesisLayer(channels, channels, w_dim, resolution, upsample=False)
        self.torgb = ToRGBLayer(channels, out_channels, w_dim)
        # A prompt-independent 3D layout prior; std 1/sqrt(C) as in the release.
        self.const_bias = (
            nn.Parameter(
                torch.randn(channels, resolution, resolution, resolution) / math.sqrt(channels)
            )
            if use_bias_tensor
            else None
        )

    def forward(
        self,
        x: Tensor,
        img: Tensor,
        w: Tensor,
        noise_mode: NoiseMode,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        x = self.conv0(x, w, noise_mode, generator)
        if self.const_bias is not None:
            x = x + self.const_bias
        x = self.conv1(x, w, noise_mode, generator)
        return x, upsample2x(img) + self.torgb(x, w)


class MappingNetwork(nn.Module):
    """``w = FC([MLP(normalize(z)), text])``: lrelu FC layers on ``z``, then a linear FC."""

    def __init__(self, z_dim: int, text_dim: int, w_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(a, b, lrelu=True) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.embed = EqualizedLinear(dims[-1] + text_dim, w_dim)

    def forward(self, z: Float[Tensor, "P Z"], text: Float[Tensor, "P D"]) -> Float[Tensor, "P W"]:
        x = normalize_2nd_moment(z)
        for layer in self.layers:
            x = layer(x)
        return self.embed(torch.cat([x, text], dim=1))


class SynthesisNetwork(nn.Module):
    """Constant 4^3 -> ... -> ``output_resolution``^3, skip-summed ToRGB outputs."""

    def __init__(
        self,
        w_dim: int,
        channels: Mapping[int, int],
        output_resolution: int,
        feature_dim: int,
        bias_max_resolution: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        resolutions = [4 * 2**i for i in range(int(math.log2(output_resolution // 4)) + 1)]
        if resolutions[-1] != output_resolution:
            raise ValueError(f"output_resolution must be 4 * 2^k, got {output_resolution}")
        missing = [r for r in resolutions if r not in channels]
        if missing:
            raise ValueError(f"channel table {dict(channels)} lacks resolutions {missing}")
        self.first_block = SynthesisPrologue(channels[4], w_dim, 4, feature_dim)
        self.blocks = nn.ModuleList(
            SynthesisBlock(
                channels[r // 2],
                channels[r],
                w_dim,
                r,
                feature_dim,
                use_bias_tensor=r <= bias_max_resolution,
            )
            for r in resolutions[1:]
        )

    def forward(
        self, w: Float[Tensor, "P W"], noise_mode: NoiseMode, generator: torch.Generator | None
    ) -> Float[Tensor, "P C R R R"]:
        x, img = self.first_block(w, noise_mode, generator)
        if self.channels_last and x.is_cuda:  # later convolutions keep the layout
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for block in self.blocks:
            x, img = block(x, img, w, noise_mode, generator)
        return img


def sample_volume(
    volume: Float[Tensor, "P C D H W"], points: Float[Tensor, "P N 3"], radius: float
) -> Float[Tensor, "P N C"]:
    """Trilinear lookup of per-prompt feature volumes at world points in ``[-radius, radius]^3``.

    Axis order (``F.grid_sample``): point ``x`` indexes the volume's last axis ``W``, ``y`` indexes
    ``H`` and ``z`` indexes ``D`` (dim 2) -- the release's convention, kept so its checkpoints
    give the same field. ``align_corners=False``; points outside the box read zeros.
    """
    num_prompts, channels = volume.shape[:2]
    if points.shape[0] != num_prompts:
        raise ValueError(
            f"points are grouped for {points.shape[0]} prompts, volume has {num_prompts}"
        )
    grid = (points / radius).to(volume.dtype).reshape(num_prompts, 1, 1, -1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(num_prompts, channels, -1).transpose(1, 2)


class VoxelField(DecodedField):
    """The field of a feature volume; keeps ``volume`` (``P x C x R^3``) for inspection/export."""

    def __init__(
        self,
        volume: Float[Tensor, "P C R R R"],
        radius: float,
        sdf_decoder: Decoder,
        rgb_decoder: Decoder,
        sphere_bias_radius: float | None,
    ) -> None:
        super().__init__(
            partial(sample_volume, volume, radius=radius),
            sdf_decoder,
            rgb_decoder,
            sphere_bias_radius,
        )
        self.volume = volume
        self.radius = radius


class ThreeDConvGenerator(Generator):
    """ScaleDreamer's 3DConv-net: pooled text + latent ``z`` -> StyleGAN2-3D feature volume -> field.

    Args:
        text_dim: width ``D`` of ``prompts.pooled`` (1024 for SD 2.1's OpenCLIP-H).
        z_dim: latent size (64).
        w_dim: style size (256).
        mapping_layers: lrelu FC layers on ``z`` before the text is joined (2).
        channels: resolution -> channels for every resolution 4 .. ``output_resolution``.
        output_resolution: edge of the output volume (128).
        bias_max_resolution: the learned 3D bias tensor is added in blocks up to this edge (64).
        feature_dim: channels of the output volume (32).
        decoder_hidden: hidden width of the SDF and colour MLPs (64).
        radius: half-edge of the scene box the volume spans (2.0).
        sphere_bias_radius: ``r`` of the SDF bias ``|x| - r`` (0.8); ``None`` disables it.
        noise_mode: per-voxel noise: ``"random"`` (fresh each call: the release's training
            mode), ``"const"`` (the fixed buffers), ``"off"`` (none).
        z_mode: ``"random"`` draws ``z ~ N(0, I)`` per prompt per call (the release's training
            data module; its evaluation fixes one draw), ``"zero"`` uses ``z = 0``, making the
            generator a deterministic function of the text (when ``noise_mode`` isn't random).
        channels_last: on CUDA, run the synthesis convolutions on channels-last (NDHWC)
            volumes, the layout cuDNN's tensor-core 3D kernels read without a transpose
            (docs/performance.md: measured by ``make bench-gpu`` before it becomes a default).
    """

    text_input: ClassVar[TextInput] = "pooled"

    def __init__(
        self,
        text_dim: int,
        z_dim: int,
        w_dim: int,
        mapping_layers: int,
        channels: Mapping[int, int],
        output_resolution: int,
        bias_max_resolution: int,
        feature_dim: int,
        decoder_hidden: int,
        radius: float,
        sphere_bias_radius: float | None,
        noise_mode: NoiseMode,
        z_mode: ZMode,
        channels_last: bool,
    ) -> None:
        super().__init__()
        if noise_mode not in ("random", "const", "off"):
            raise ValueError(f"noise_mode must be random | const | off, got {noise_mode!r}")
        if z_mode not in ("random", "zero"):
            raise ValueError(f"z_mode must be random | zero, got {z_mode!r}")
        channels = {int(k): int(v) for k, v in dict(channels).items()}  # YAML/OmegaConf keys
        self.z_dim = z_dim
        self.radius = float(radius)
        self.sphere_bias_radius = None if sphere_bias_radius is None else float(sphere_bias_radius)
        self.noise_mode: NoiseMode = noise_mode
        self.z_mode: ZMode = z_mode
        self.mapping = MappingNetwork(z_dim, text_dim, w_dim, mapping_layers)
        self.synthesis = SynthesisNetwork(
            w_dim, channels, output_resolution, feature_dim, bias_max_resolution, channels_last
        )
        self.sdf_network = BiasFreeMLP([feature_dim, decoder_hidden, 1])
        self.rgb_network = BiasFreeMLP([feature_dim, decoder_hidden, 3])

    def sample_z(
        self, num_prompts: int, generator: torch.Generator | None, like: Tensor
    ) -> Float[Tensor, "P Z"]:
        """Latent codes according to ``z_mode`` (dtype/device of ``like``)."""
        if self.z_mode == "zero":
            return like.new_zeros(num_prompts, self.z_dim)
        return _randn((num_prompts, self.z_dim), generator, like)

    def synthesize(
        self,
        text: Float[Tensor, "P D"],
        z: Float[Tensor, "P Z"] | None = None,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, "P C R R R"]:
        """The feature volume for pooled text embeddings (``z`` drawn per ``z_mode`` if omitted).

        ``z`` is drawn before any noise, so a seeded ``generator`` fixes both.
        """
        text = text.to(self.mapping.embed.weight.dtype)
        if z is None:
            z = self.sample_z(text.shape[0], generator, text)
        w = self.mapping(z, text)
        return self.synthesis(w, self.noise_mode, generator)

    def field(self, volume: Float[Tensor, "P C R R R"]) -> VoxelField:
        """Wrap a feature volume with this generator's decoders."""
        return VoxelField(
            volume,
            self.radius,
            sdf_decoder=self.sdf_network,
            rgb_decoder=self.rgb_network,
            sphere_bias_radius=self.sphere_bias_radius,
        )

    def forward(self, prompts: PromptBatch, generator: torch.Generator | None = None) -> VoxelField:
        return self.field(self.synthesize(self.text_embedding(prompts), generator=generator))


def release_state_dict_to_generator(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ScaleDreamer 3DConv-net checkpoint's geometry weights to this module's keys.

    Takes the Lightning ``state_dict`` (keys ``geometry.space_generator.*``,
    ``geometry.sdf_network.layers.*``, ``geometry.feature_network.layers.*``) and drops what this
    module does not hold (the unused ``mapping.w_avg``, ``geometry.bbox``, other modules).
    """
    renames = {
        "geometry.space_generator.": "",
        "geometry.sdf_network.": "sdf_network.",
        "geometry.feature_network.": "rgb_network.",
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                name = new + key[len(old) :]
                if name != "mapping.w_avg":
                    out[name] = value
                break
    return out
