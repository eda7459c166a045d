"""Triplane-Transformer specifics: size of the paper's model, plane lookup, batching, the release."""

from __future__ import annotations

import math

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict

from asd3d.build import build_system
from asd3d.generator.triplane import (
    TriplaneTransformerGenerator,
    release_state_dict_to_generator,
    sample_triplane,
    sigmoid_mipnerf,
)
from asd3d.io import load_checkpoint
from asd3d.types import PromptBatch

from cli_helpers import run_entry
from conftest import TINY, bare_trainer, compose_train
from generator_testing import (
    SMALL_OVERRIDES,
    build_small_generator,
    load_generator_config,
    make_prompts,
    random_points,
)

# REFERENCE §3: geometry + background + renderer of the release. The background MLP (SH degree 3
# = 9 dims -> 16 -> 16 -> 3, bias-free: 448 parameters) and the renderer's variance (1) are not
# part of the generator.
RELEASE_TOTAL = 120_564_929
RELEASE_NOT_GEOMETRY = 9 * 16 + 16 * 16 + 16 * 3 + 1


def full_size_on_meta() -> TriplaneTransformerGenerator:
    with torch.device("meta"):
        return hydra.utils.instantiate(load_generator_config("triplane"))


def test_full_size_parameter_count_matches_release():
    count = sum(p.numel() for p in full_size_on_meta().parameters())
    print(f"Triplane-Transformer: {count:,} generator parameters; release {RELEASE_TOTAL:,}")
    assert abs(count - RELEASE_TOTAL) / RELEASE_TOTAL < 0.02
    assert count + RELEASE_NOT_GEOMETRY == RELEASE_TOTAL


def test_full_size_triplane_shape_on_meta():
    planes = full_size_on_meta().triplane(torch.zeros(2, 77, 1024, device="meta"))
    assert planes.shape == (2, 3, 32, 64, 64)


# ---------------------------------------------------------------------------- plane lookup
def coordinate_planes(resolution: int) -> torch.Tensor:
    """Planes whose 2 channels hold the normalised (first, second) lookup coordinate of each
    pixel centre: bilinear lookup (align_corners=False) then returns the coordinates exactly."""
    centres = (torch.arange(resolution) * 2 + 1) / resolution - 1
    first = centres.expand(resolution, resolution)  # varies along W
    second = centres[:, None].expand(resolution, resolution)  # varies along H
    return torch.stack([first, second]).expand(1, 3, 2, resolution, resolution)


def test_plane_axes_are_xy_xz_zy_concatenated_plane_by_plane():
    res, radius = 8, 2.0
    points = random_points(1, 50, radius=radius * (1 - 1 / res))  # inside the pixel centres
    features = sample_triplane(coordinate_planes(res), points, radius)
    x, y, z = (points[0] / radius).unbind(-1)
    expected = torch.stack([x, y, x, z, z, y], dim=-1)
    torch.testing.assert_close(features[0], expected, atol=1e-5, rtol=0)


def test_points_outside_the_box_read_zeros():
    planes = torch.ones(2, 3, 4, 8, 8)
    points = torch.tensor([[[2.5, 0.0, 0.0]], [[0.0, 0.0, -9.0]]])
    features = sample_triplane(planes, points, radius=2.0)
    # x outside: planes (x,y) and (x,z) read zeros, (z,y) does not; likewise for z.
    assert features[0, 0, :8].abs().max() == 0 and (features[0, 0, 8:] == 1).all()
    assert (features[1, 0, :4] == 1).all() and features[1, 0, 4:].abs().max() == 0


def test_lookup_is_per_prompt():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(3, 3, 5, 6, 7, generator=g)
    points = random_points(3, 40)
    batched = sample_triplane(planes, points, radius=2.0)
    for i in range(3):
        single = sample_triplane(planes[i : i + 1], points[i : i + 1], radius=2.0)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grouped for 2 prompts"):
        sample_triplane(planes, points[:2], radius=2.0)


# ---------------------------------------------------------------------------- generator
def test_reads_token_states_and_ignores_the_seed():
    gen = build_small_generator("triplane")
    assert gen.text_input == "tokens"
    prompts = make_prompts(2, 16)
    points = random_points(2, 30)
    a = gen(prompts, torch.Generator().manual_seed(1))(points)
    b = gen(prompts, torch.Generator().manual_seed(2))(points)
    torch.testing.assert_close(a.sdf, b.sdf, rtol=0, atol=0)
    field = gen(prompts)
    assert field.planes.shape == (2, 3, 4, 8, 8)


def test_prompts_in_a_batch_do_not_mix():
    gen = build_small_generator("triplane")
    prompts = make_prompts(3, 16)
    points = random_points(3, 64)
    out = gen(prompts)(points)
    changed_tokens = prompts.tokens.clone()
    changed_tokens[1] = torch.randn_like(changed_tokens[1])
    changed = PromptBatch(ids=prompts.ids, texts=prompts.texts, tokens=changed_tokens)
    out_changed = gen(changed)(points)
    for i in (0, 2):
        torch.testing.assert_close(out_changed.sdf[i], out.sdf[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(out_changed.rgb[i], out.rgb[i], rtol=0, atol=1e-6)
    assert (out_changed.sdf[1] - out.sdf[1]).abs().max() > 1e-4
    for i in range(3):
        single = PromptBatch(
            ids=prompts.ids[i : i + 1],
            texts=prompts.texts[i : i + 1],
            tokens=prompts.tokens[i : i + 1],
        )
        torch.testing.assert_close(
            gen(single)(points[i : i + 1]).sdf, out.sdf[i : i + 1], rtol=0, atol=1e-5
        )


def test_gradient_reaches_query_tokens_every_cross_attention_and_the_text():
    gen = build_small_generator("triplane")
    prompts = make_prompts(2, 16)
    tokens = prompts.tokens.clone().requires_grad_(True)
    prompts = PromptBatch(ids=prompts.ids, texts=prompts.texts, tokens=tokens)
    out = gen(prompts)(random_points(2, 200))
    (out.sdf.square().mean() + out.rgb.mean()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert gen.transformer.query_tokens.grad.abs().sum() > 0
    for block in gen.transformer.blocks:
        assert block.cross_attn.to_k.weight.grad.abs().sum() > 0
        assert block.cross_attn.to_v.weight.grad.abs().sum() > 0


def test_untrained_field_is_near_the_sphere_bias():
    gen = build_small_generator("triplane")
    points = random_points(1, 200)
    out = gen(make_prompts(1, 16))(points)
    bias = points.norm(dim=-1, keepdim=True) - 0.8
    assert (out.sdf - bias).abs().mean() < 0.5


def test_colour_activation_is_the_releases_padded_sigmoid():
    x = torch.tensor([-1e4, 0.0, 1e4])
    torch.testing.assert_close(sigmoid_mipnerf(x), torch.tensor([-0.001, 0.5, 1.001]))


def test_bad_options_are_rejected():
    with pytest.raises(InstantiationException, match="colour_activation must be one of"):
        build_small_generator("triplane", colour_activation="tanh")
    with pytest.raises(InstantiationException, match="not divisible by num_heads=3"):
        build_small_generator("triplane", num_heads=3)


# ---------------------------------------------------------------------------- the release
def release_like_state_dict(
    text_dim: int,
    width: int,
    num_layers: int,
    token_resolution: int,
    feature_dim: int,
    decoder_hidden: int,
    mlp_ratio: float = 4.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Lightning ``state_dict`` with the key names and shapes of a ScaleDreamer Triplane
    checkpoint (geometry ``Triplane-transformer-sdf`` with ``local_text: true``, neural
    environment-map background, VolSDF renderer), filled with small random values."""
    g = torch.Generator().manual_seed(seed)

    def tensor(*shape: int, scale: float = 0.3, offset: float = 0.0) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * scale + offset

    hidden = int(width * mlp_ratio)
    sg = "geometry.space_generator."
    state = {sg + "pos_embed": tensor(1, 3 * token_resolution**2, width, scale=width**-0.5)}
    for i in range(num_layers):
        layer = f"{sg}layers.{i}."
        for norm in ("norm1", "norm2", "norm3"):
            state[f"{layer}{norm}.weight"] = tensor(width, scale=0.1, offset=1.0)
            state[f"{layer}{norm}.bias"] = tensor(width, scale=0.1)
        for attn, context in (("cross_attn", text_dim), ("self_attn", width)):
            state[f"{layer}{attn}.to_q.weight"] = tensor(width, width, scale=width**-0.5)
            state[f"{layer}{attn}.to_k.weight"] = tensor(width, context, scale=context**-0.5)
            state[f"{layer}{attn}.to_v.weight"] = tensor(width, context, scale=context**-0.5)
            state[f"{layer}{attn}.to_out.0.weight"] = tensor(width, width, scale=width**-0.5)
            state[f"{layer}{attn}.to_out.0.bias"] = tensor(width, scale=0.1)
        state[f"{layer}mlp.0.weight"] = tensor(hidden, width, scale=width**-0.5)
        state[f"{layer}mlp.0.bias"] = tensor(hidden, scale=0.1)
        state[f"{layer}mlp.3.weight"] = tensor(width, hidden, scale=hidden**-0.5)
        state[f"{layer}mlp.3.bias"] = tensor(width, scale=0.1)
    state[sg + "norm.weight"] = tensor(width, scale=0.1, offset=1.0)
    state[sg + "norm.bias"] = tensor(width, scale=0.1)
    state[sg + "deconv.weight"] = tensor(width, feature_dim, 2, 2, scale=width**-0.5)
    for net, out in (("sdf_network", 1), ("feature_network", 3)):
        dims = [3 * feature_dim, decoder_hidden, decoder_hidden, out]
        for j, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            state[f"geometry.{net}.layers.{2 * j}.weight"] = tensor(d_out, d_in, scale=d_in**-0.5)
    state["geometry.bbox"] = tensor(2, 3)
    state["background.network.layers.0.weight"] = tensor(16, 9)
    state["renderer.variance._inv_std"] = tensor(1)
    return state


def release_field(state, tokens, points, num_heads, radius=2.0, sphere_radius=0.8):
    """The release's forward pass written out from its description, on release-named weights
    (diffusers-style attention, OpenLRM reshape, EG3D plane projection, VanillaMLP decoders)."""

    def w(key):
        return state["geometry." + key]

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps=1e-6)

    def attention(name, x, context):
        q, k, v = (
            (t @ w(f"{name}.to_{n}.weight").T).unflatten(-1, (num_heads, -1)).transpose(1, 2)
            for n, t in (("q", x), ("k", context), ("v", context))
        )
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return out @ w(f"{name}.to_out.0.weight").T + w(f"{name}.to_out.0.bias")

    n = tokens.shape[0]
    x = w("space_generator.pos_embed").repeat(n, 1, 1)
    i = 0
    while f"geometry.space_generator.layers.{i}.norm1.weight" in state:
        p = f"space_generator.layers.{i}."
        x = x + attention(p + "cross_attn", layer_norm(x, p + "norm1"), tokens)
        h = layer_norm(x, p + "norm2")
        x = x + attention(p + "self_attn", h, h)
        h = F.gelu(layer_norm(x, p + "norm3") @ w(p + "mlp.0.weight").T + w(p + "mlp.0.bias"))
        x = x + h @ w(p + "mlp.3.weight").T + w(p + "mlp.3.bias")
        i += 1
    x = layer_norm(x, "space_generator.norm")
    r = math.isqrt(x.shape[1] // 3)
    x = torch.einsum("nihwd->indhw", x.view(n, 3, r, r, -1)).reshape(3 * n, -1, r, r)
    x = F.conv_transpose2d(x, w("space_generator.deconv.weight"), stride=2)
    planes = torch.einsum("indhw->nidhw", x.view(3, n, *x.shape[-3:]))

    axes = torch.tensor(
        [
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
            [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
        ],
        dtype=torch.float32,
    )
    unit = points / radius
    projected = torch.einsum("pmk,akj->pamj", unit, torch.linalg.inv(axes))[..., :2]
    c = planes.shape[2]
    feats = F.grid_sample(
        planes.reshape(3 * n, c, *planes.shape[-2:]),
        projected.reshape(3 * n, 1, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    m = points.shape[1]
    feats = feats.permute(0, 3, 2, 1).reshape(n, 3, m, c).permute(0, 2, 1, 3).reshape(n, m, 3 * c)

    def mlp(net):
        h = feats
        for j in range(3):
            if j:
                h = torch.relu(h)
            h = h @ w(f"{net}.layers.{2 * j}.weight").T
        return h

    sdf = mlp("sdf_network") + points.norm(dim=-1, keepdim=True) - sphere_radius
    rgb = torch.sigmoid(mlp("feature_network")) * 1.002 - 0.001
    return sdf, rgb


SMALL = SMALL_OVERRIDES["triplane"]


def small_release_state() -> dict[str, torch.Tensor]:
    return release_like_state_dict(
        text_dim=SMALL["text_dim"],
        width=SMALL["width"],
        num_layers=SMALL["num_layers"],
        token_resolution=SMALL["token_resolution"],
        feature_dim=SMALL["feature_dim"],
        decoder_hidden=SMALL["decoder_hidden"],
        mlp_ratio=SMALL["mlp_ratio"],
    )


def test_release_checkpoint_loads_strictly_and_gives_the_releases_field():
    release = small_release_state()
    gen = build_small_generator("triplane")
    gen.load_state_dict(release_state_dict_to_generator(release), strict=True)
    prompts = make_prompts(2, SMALL["text_dim"])
    points = random_points(2, 300, radius=2.2)  # some points outside the box
    out = gen(prompts)(points)
    sdf, rgb = release_field(release, prompts.tokens, points, num_heads=SMALL["num_heads"])
    torch.testing.assert_close(out.sdf, sdf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.rgb, rgb, rtol=1e-4, atol=1e-5)


def test_every_full_size_release_key_maps_to_a_parameter_of_the_same_shape():
    gen = full_size_on_meta()
    release = release_like_state_dict(
        text_dim=1024,
        width=768,
        num_layers=12,
        token_resolution=32,
        feature_dim=32,
        decoder_hidden=64,
        device="meta",
    )
    mapped = release_state_dict_to_generator(release)
    own = gen.state_dict()
    assert set(mapped) == set(own)
    wrong = {
        k: (tuple(v.shape), tuple(own[k].shape))
        for k, v in mapped.items()
        if v.shape != own[k].shape
    }
    assert not wrong, wrong
    geometry = [k for k in release if k.startswith("geometry.") and k != "geometry.bbox"]
    assert len(mapped) == len(geometry)


def test_release_pooled_text_variant_is_refused():
    release = small_release_state()
    release["geometry.space_generator.proj.weight"] = torch.zeros(16, 16)
    with pytest.raises(ValueError, match="local_text=false"):
        release_state_dict_to_generator(release)


# ---------------------------------------------------------------------------- training
# The quickstart overlay carries 3DConv-net sizes in its `generator:` block, so a triplane run
# states its own small settings instead of composing the quickstart.
TRIPLANE_TINY_CLI = [
    *(o for o in TINY if o != "experiment=quickstart_exact"),
    "distiller=sds",
    "trainer=cpu",
    "generator=triplane",
    "optimizer=adan",  # the release trains the triplane with Adan
    "prior.text_dim=16",
    "generator.text_dim=${prior.text_dim}",
    *(f"generator.{k}={v}" for k, v in SMALL.items() if k != "text_dim"),
    "renderer.num_samples_stratified=16",
    "renderer.num_samples_importance=8",
    "renderer.eikonal_points=64",
]


def test_triplane_trains_with_adan_from_the_cli_on_the_procedural_prior(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", *TRIPLANE_TINY_CLI, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert ckpt["asd3d_config"]["generator"]["_target_"].endswith("TriplaneTransformerGenerator")
    assert "generator.transformer.query_tokens" in ckpt["state_dict"]
    assert ckpt["asd3d_config"]["system"]["optimizer"]["_target_"] == "timm.optim.Adan"
    assert "exp_avg_diff" in ckpt["optimizer_states"][0]["state"][0]


# ---------------------------------------------------------------------------- learning
# Small triplane for the procedural world: 0.36M parameters, 16^2 planes.
LEARNING_GENERATOR = dict(
    text_dim="${prior.text_dim}",
    width=64,
    num_layers=2,
    num_heads=4,
    mlp_ratio=2.0,
    token_resolution=8,
    feature_dim=8,
    decoder_hidden=32,
    radius="${renderer.radius}",
    sphere_bias_radius=0.5,
)
LEARNING = [
    "experiment=quickstart_exact",
    "logger=csv",
    "corpus.num_prompts=8",
    "corpus.num_test_prompts=8",
    "system.render_resolution=32",
    "system.prompts_per_step=4",
    "system.validation.num_views=4",
    "system.image_every_n_steps=0",
    "renderer.num_samples_stratified=32",
    "renderer.num_samples_importance=8",
    "renderer.eikonal_points=256",
]


@pytest.mark.slow
def test_triplane_learns_the_procedural_world(tmp_path):
    """Oracle R@1 >= 0.9 on 8 procedural prompts (quickstart world: SDS, Adam 2e-3).

    Measured (seed 0, one thread on a busy 2-core machine, 21 min): R@1 0.125 -> 1.0,
    PSNR 12.5 -> 26.3 dB, mask IoU 0.29 -> 0.81.
    """
    steps = 600
    cfg = compose_train([*LEARNING, f"trainer.max_steps={steps}"], tmp_path / "run")
    with open_dict(cfg):
        cfg.generator = OmegaConf.merge(load_generator_config("triplane"), LEARNING_GENERATOR)
    pl.seed_everything(0, verbose=False)
    system = build_system(cfg, {})
    trainer = bare_trainer(
        steps, limit_val_batches=None, check_val_every_n_epoch=None, val_check_interval=steps
    )
    before = trainer.validate(system, verbose=False)[0]
    trainer.fit(system)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print("before", before, "after", after)
    assert after["val/oracle_r1"] >= 0.9, (before, after)
