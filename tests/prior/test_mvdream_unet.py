"""MVDream's multi-view UNet: the release's layout and counts, and its attention pattern, on a
tiny random model (no weights needed)."""

from __future__ import annotations

import math

import pytest
import torch

from asd3d.prior.mvdream_unet import (
    MVDREAM_SD21_BASE_4VIEW_CONFIG,
    MultiViewUNet,
    load_official_state_dict,
    timestep_embedding,
)

TINY_CONFIG = {
    **MVDREAM_SD21_BASE_4VIEW_CONFIG,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "context_dim": 16,
    "camera_dim": 16,
    "transformer_depth": 1,
}
GROUPS, VIEWS, SIZE, TOKENS = 2, 4, 8, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine are far faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0) -> MultiViewUNet:
    """A tiny UNet whose zero-initialised residual branches are randomised: with the release's
    zero init every transformer would be the identity and cross-view effects invisible."""
    torch.manual_seed(seed)
    unet = MultiViewUNet(**TINY_CONFIG).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return unet


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = GROUPS * VIEWS
    x = torch.randn(n, 4, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    context = torch.randn(n, TOKENS, 16, generator=g)
    camera = torch.randn(n, 16, generator=g)
    return x, t, context, camera


@pytest.fixture(scope="module")
def unet() -> MultiViewUNet:
    return tiny_unet()


def test_full_size_matches_release_counts():
    with torch.device("meta"):
        full = MultiViewUNet(**MVDREAM_SD21_BASE_4VIEW_CONFIG)
        plain = MultiViewUNet(**{**MVDREAM_SD21_BASE_4VIEW_CONFIG, "camera_dim": None})
    state = full.state_dict()
    assert len(state) == 690
    assert sum(p.numel() for p in full.parameters()) == 867_572_164
    # Without the camera MLP it is SD 2.1-base's UNet (865,910,724 parameters).
    assert sum(p.numel() for p in plain.parameters()) == 865_910_724
    assert len(plain.state_dict()) == 686
    shapes = {
        "time_embed.0.weight": (1280, 320),
        "camera_embed.0.weight": (1280, 16),
        "camera_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # The lowest level (ds = 8) has no transformer; its blocks hold only a ResBlock.
    assert "input_blocks.10.1.norm.weight" not in state
    assert "output_blocks.0.1.norm.weight" not in state


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 10])
    emb = timestep_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freq = math.exp(-math.log(10000.0) * 1 / 4)
    assert emb[1, 1].item() == pytest.approx(math.cos(10 * freq), abs=1e-6)
    assert emb[1, 5].item() == pytest.approx(math.sin(10 * freq), abs=1e-6)
    assert timestep_embedding(t, 7).shape == (2, 7)


def test_forward_shapes_and_determinism(unet):
    x, t, context, camera = inputs()
    with torch.no_grad():
        out = unet(x, t, context=context, camera=camera, num_frames=VIEWS)
        again = unet(x, t, context=context, camera=camera, num_frames=VIEWS)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    with torch.no_grad():  # a shared 0-d timestep broadcasts like a per-row one
        shared = unet(x, t[0], context=context, camera=camera, num_frames=VIEWS)
        rows = unet(x, t[:1].expand(len(x)), context=context, camera=camera, num_frames=VIEWS)
    torch.testing.assert_close(shared, rows)


def changed_views(unet, num_frames: int, view: int) -> torch.Tensor:
    """Per-view max |output change| when only ``view`` of the input is perturbed."""
    x, t, context, camera = inputs()
    x2 = x.clone()
    x2[view] += torch.randn_like(x2[view])
    with torch.no_grad():
        a = unet(x, t, context=context, camera=camera, num_frames=num_frames)
        b = unet(x2, t, context=context, camera=camera, num_frames=num_frames)
    return (a - b).abs().flatten(1).amax(dim=1)


def test_self_attention_spans_the_views_of_a_group_only(unet):
    change = changed_views(unet, VIEWS, view=1)
    assert (change[:VIEWS] > 1e-3).all()  # every view of group 0, not only view 1
    assert (change[VIEWS:] < 1e-6).all()  # group 1 untouched


def test_one_frame_means_independent_views(unet):
    change = changed_views(unet, 1, view=1)
    assert change[1] > 1e-3
    assert (torch.cat([change[:1], change[2:]]) < 1e-6).all()


def test_camera_conditioning(unet):
    x, t, context, camera = inputs()
    with torch.no_grad():
        without = unet(x, t, context=context, camera=None, num_frames=VIEWS)
        with_camera = unet(x, t, context=context, camera=camera, num_frames=VIEWS)
    assert without.shape == x.shape
    assert (without - with_camera).abs().max() > 1e-3
    plain = MultiViewUNet(**{**TINY_CONFIG, "camera_dim": None})
    assert not hasattr(plain, "camera_embed")
    with pytest.raises(ValueError, match="camera"):
        plain(x, t, context=context, camera=camera, num_frames=VIEWS)


def test_batch_must_hold_whole_groups(unet):
    x, t, context, camera = inputs()
    with pytest.raises(ValueError, match="num_frames"):
        unet(x[:6], t[:6], context=context[:6], camera=camera[:6], num_frames=VIEWS)


def test_official_checkpoint_layout_round_trips(unet):
    x, t, context, camera = inputs()
    checkpoint = {f"model.diffusion_model.{k}": v.clone() for k, v in unet.state_dict().items()}
    checkpoint["first_stage_model.x"] = torch.zeros(1)
    checkpoint["cond_stage_model.model.token_embedding.weight"] = torch.zeros(2, 2)
    checkpoint["betas"] = torch.zeros(1000)  # schedule buffers of the LDM wrapper
    fresh = tiny_unet(seed=123)
    load_official_state_dict(fresh, checkpoint)
    with torch.no_grad():
        expected = unet(x, t, context=context, camera=camera, num_frames=VIEWS)
        got = fresh(x, t, context=context, camera=camera, num_frames=VIEWS)
    assert torch.equal(expected, got)

    bare = {**unet.state_dict(), "first_stage_model.x": torch.zeros(1)}
    load_official_state_dict(tiny_unet(seed=5), bare)

    broken = dict(checkpoint)
    del broken["model.diffusion_model.out.2.weight"]
    broken["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing") as error:
        load_official_state_dict(fresh, broken)
    assert "out.2.weight" in str(error.value) and "extra.weight" in str(error.value)
    assert "\n" not in str(error.value)
