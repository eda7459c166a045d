"""3DConv-net specifics: size of the paper's model, volume lookup, noise / z modes, the release."""

from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException

from asd3d.generator.conv3d import (
    ThreeDConvGenerator,
    modulated_conv3d,
    release_state_dict_to_generator,
    sample_volume,
)

from generator_testing import (
    build_small_generator,
    load_generator_config,
    make_prompts,
    random_points,
)

# REFERENCE §3: geometry + background + renderer of the release. The background is threestudio's
# neural environment map (SH degree 3 = 9 dims -> 16 -> 16 -> 3, bias-free: 448 parameters) and
# the renderer holds one (VolSDF variance), so the generator alone must have 449 fewer.
RELEASE_TOTAL = {1: 88_687_372, 2: 144_798_604}
RELEASE_NOT_GEOMETRY = 9 * 16 + 16 * 16 + 16 * 3 + 1


def full_size_on_meta(multiplier: int) -> ThreeDConvGenerator:
    channels = {
        4: 512,
        8: 512,
        16: 512,
        32: 256 * multiplier,
        64: 128 * multiplier,
        128: 64 * multiplier,
    }
    cfg = load_generator_config("3dconv", channels=channels)
    with torch.device("meta"):
        return hydra.utils.instantiate(cfg)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_full_size_parameter_count_matches_release(multiplier):
    gen = full_size_on_meta(multiplier)
    count = sum(p.numel() for p in gen.parameters())
    reference = RELEASE_TOTAL[multiplier]
    print(
        f"3DConv-net m={multiplier}: {count:,} generator parameters; "
        f"+{RELEASE_NOT_GEOMETRY} (background + renderer) = {count + RELEASE_NOT_GEOMETRY:,}; "
        f"release {reference:,}"
    )
    assert abs(count - reference) / reference < 0.02
    assert count + RELEASE_NOT_GEOMETRY == reference


def test_full_size_volume_shape_on_meta():
    gen = full_size_on_meta(1)
    text = torch.zeros(2, 1024, device="meta")
    assert gen.synthesize(text).shape == (2, 32, 128, 128, 128)


def release_lookup(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The release's per-point lookup (points already in [-1, 1]); right only for batch 1."""
    b, df = volume.shape[:2]
    out = F.grid_sample(volume, points.view(b, 1, 1, -1, 3), align_corners=False, mode="bilinear")
    return out.reshape(df, -1).T.reshape(*points.shape[:-1], df)


def test_batched_lookup_equals_single_prompt_lookups_and_the_release():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(3, 5, 6, 7, 8, generator=g)
    points = random_points(3, 100, radius=2.2)  # some points outside the box read zeros
    batched = sample_volume(volume, points, radius=2.0)
    assert batched.shape == (3, 100, 5)
    for i in range(3):
        single = sample_volume(volume[i : i + 1], points[i : i + 1], radius=2.0)
        torch.testing.assert_close(batched[i : i + 1], single)
        torch.testing.assert_close(
            single, release_lookup(volume[i : i + 1], points[i : i + 1] / 2.0)
        )


def test_lookup_axis_order_x_is_width_z_is_depth():
    r = 4
    idx = torch.arange(r, dtype=torch.float32)
    volume = torch.stack(
        [
            idx.view(1, 1, r).expand(r, r, r),  # varies along W
            idx.view(1, r, 1).expand(r, r, r),  # varies along H
            idx.view(r, 1, 1).expand(r, r, r),
        ]
    )[None]  # varies along D
    # With align_corners=False voxel centre i sits at ((i + 0.5) / r * 2 - 1) * radius.
    centre = lambda i: ((i + 0.5) / r * 2 - 1) * 2.0  # noqa: E731
    point = torch.tensor([[[centre(1), centre(2), centre(3)]]])
    assert sample_volume(volume, point, radius=2.0).flatten().tolist() == [1.0, 2.0, 3.0]


def test_modulated_conv_equals_per_sample_demodulated_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g, dtype=torch.float64)
    styles = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for demodulate in (True, False):
        expected = []
        for i in range(2):
            w = weight * styles[i].view(1, 3, 1, 1, 1)
            if demodulate:
                w = w * (w.square().sum(dim=(1, 2, 3, 4), keepdim=True) + 1e-8).rsqrt()
            expected.append(F.conv3d(x[i : i + 1], w, padding=1))
        torch.testing.assert_close(
            modulated_conv3d(x, weight, styles, demodulate), torch.cat(expected)
        )


def test_noise_off_and_zero_z_make_the_field_independent_of_the_seed():
    gen = build_small_generator("3dconv", noise_mode="off", z_mode="zero")
    for name, p in gen.named_parameters():  # make noise matter if it were drawn
        if name.endswith("noise_strength"):
            p.data.fill_(0.5)
    prompts, points = make_prompts(2, 16), random_points(2, 64)
    a = gen(prompts, torch.Generator().manual_seed(1))(points)
    b = gen(prompts, torch.Generator().manual_seed(2))(points)
    torch.testing.assert_close(a.sdf, b.sdf, rtol=0, atol=0)

    gen.noise_mode = "const"
    c = gen(prompts, torch.Generator().manual_seed(1))(points)
    d = gen(prompts, torch.Generator().manual_seed(2))(points)
    torch.testing.assert_close(c.sdf, d.sdf, rtol=0, atol=0)
    assert (c.sdf - a.sdf).abs().max() > 1e-5  # the constant noise is used

    gen.noise_mode = "random"
    e = gen(prompts, torch.Generator().manual_seed(1))(points)
    f = gen(prompts, torch.Generator().manual_seed(2))(points)
    assert (e.sdf - f.sdf).abs().max() > 1e-5


def test_random_z_depends_on_the_seed():
    gen = build_small_generator("3dconv", noise_mode="off", z_mode="random")
    prompts, points = make_prompts(1, 16), random_points(1, 64)
    a = gen(prompts, torch.Generator().manual_seed(1))(points)
    b = gen(prompts, torch.Generator().manual_seed(2))(points)
    assert (a.sdf - b.sdf).abs().max() > 1e-5


def test_untrained_field_is_near_the_sphere_bias():
    gen = build_small_generator("3dconv")
    for mlp in (gen.sdf_network, gen.rgb_network):
        for p in mlp.parameters():
            p.data.zero_()
    points = random_points(2, 32)
    out = gen(make_prompts(2, 16), torch.Generator().manual_seed(0))(points)
    torch.testing.assert_close(out.sdf, points.norm(dim=-1, keepdim=True) - 0.8)
    torch.testing.assert_close(out.rgb, torch.full_like(out.rgb, 0.5))


def test_release_checkpoint_keys_load_strictly():
    gen = build_small_generator("3dconv")
    renames = {"sdf_network.": "geometry.sdf_network.", "rgb_network.": "geometry.feature_network."}
    release = {}
    for key, value in gen.state_dict().items():
        prefix = next((new for old, new in renames.items() if key.startswith(old)), None)
        release[
            (prefix + key.split(".", 1)[1]) if prefix else "geometry.space_generator." + key
        ] = value
    release["geometry.space_generator.mapping.w_avg"] = torch.zeros(16)
    release["geometry.bbox"] = torch.zeros(2, 3)
    release["background.network.layers.0.weight"] = torch.zeros(16, 9)
    gen.load_state_dict(release_state_dict_to_generator(release), strict=True)


def test_bad_options_are_rejected():
    # hydra wraps the constructor's ValueError, keeping its message
    with pytest.raises(InstantiationException, match="noise_mode"):
        build_small_generator("3dconv", noise_mode="none")
    with pytest.raises(InstantiationException, match="lacks resolutions"):
        build_small_generator("3dconv", channels={4: 8, 8: 8})


def test_prompts_in_a_batch_do_not_mix():
    gen = build_small_generator("3dconv", noise_mode="const", z_mode="zero")
    prompts, points = make_prompts(3, 16), random_points(3, 64)
    batched = gen(prompts)(points)
    for i in range(3):
        one = type(prompts)(
            ids=prompts.ids[i : i + 1],
            texts=prompts.texts[i : i + 1],
            pooled=prompts.pooled[i : i + 1],
        )
        single = gen(one)(points[i : i + 1])
        torch.testing.assert_close(batched.sdf[i : i + 1], single.sdf)
        torch.testing.assert_close(batched.rgb[i : i + 1], single.rgb)
