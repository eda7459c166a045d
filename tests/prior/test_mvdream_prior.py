"""The MVDream prior does what the release's UNet call does, on a tiny random model saved in the
release's file formats (tests/prior/tiny_mvdream.py) and loaded through the real loading path."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from asd3d.prior.mvdream import MVDreamPrior, camera_codes
from asd3d.types import Cameras, Condition, PromptBatch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_mvdream import TINY_UNET_CONFIG, TINY_UNET_OVERRIDES, save_tiny_mvdream  # noqa: E402
from tiny_sd import LATENT_SIZE, RESOLUTION, TEXT_DIM  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf"
PROMPTS = ("a red cube", "a small blue sphere on a table")
VIEWS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine are far faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return save_tiny_mvdream(tmp_path_factory.mktemp("tiny_mvdream"))


def make_prior(tiny: dict, **kwargs) -> MVDreamPrior:
    options = {
        "pretrained": str(tiny["pretrained"]),
        "checkpoint": str(tiny["checkpoint"]),
        "unet": TINY_UNET_CONFIG,
        "text_dim": TEXT_DIM,
        "resolution": RESOLUTION,
        "dtype": "fp32",
        **kwargs,
    }
    return MVDreamPrior(**options)


@pytest.fixture(scope="module")
def prior(tiny) -> MVDreamPrior:
    return make_prior(tiny)


def mvdream_cameras(num_prompts: int, seed: int = 0, **overrides) -> Cameras:
    """Cameras drawn by conf/cameras/mvdream.yaml (optionally with changed ranges)."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "cameras" / "mvdream.yaml"), overrides)
    sampler = instantiate(cfg)
    return sampler.sample(num_prompts, generator=torch.Generator().manual_seed(seed))


def distiller_batch(prior: MVDreamPrior, seed: int = 0):
    """What a distiller sends: both branches of 2 prompts x 4 views, mixed timesteps (16 rows)."""
    g = torch.Generator().manual_seed(seed)
    cams = mvdream_cameras(len(PROMPTS), seed)
    pair = prior.condition(PromptBatch(ids=torch.arange(len(PROMPTS)), texts=PROMPTS), cams)
    condition = Condition.concat([pair.positive, pair.negative])
    x_t = torch.randn(len(condition), 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    t = torch.randint(0, 1000, (len(condition) // VIEWS,), generator=g).repeat_interleave(VIEWS)
    return x_t, t, condition


# --------------------------------------------------------------------------- denoiser
def test_prediction_is_one_direct_multiview_unet_call(prior, tiny):
    x_t, t, condition = distiller_batch(prior)
    calls = []
    handle = prior.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        got = prior.predict_eps(x_t, t, condition)
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        expected = tiny["unet"](
            x_t,
            t,
            context=condition.tokens,
            camera=camera_codes(condition.cameras),
            num_frames=VIEWS,
        )
    assert got.dtype == torch.float32 and got.shape == x_t.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The unconditional rows carry the release's negative prompt, not the prompt.
    negative = prior.encode_text([prior.negative_prompt]).tokens[0]
    torch.testing.assert_close(condition.tokens[-1], negative)


def test_safetensors_checkpoint_gives_the_same_prior(tiny, prior):
    other = make_prior(tiny, checkpoint=str(tiny["safetensors"]))
    x_t, t, condition = distiller_batch(prior, seed=3)
    torch.testing.assert_close(
        other.predict_eps(x_t, t, condition), prior.predict_eps(x_t, t, condition)
    )


def changed_rows(prior: MVDreamPrior, row: int, condition=None) -> torch.Tensor:
    """Per-row max |prediction change| when only input ``row`` is perturbed."""
    x_t, t, default_condition = distiller_batch(prior)
    condition = condition or default_condition
    x2 = x_t.clone()
    x2[row] += torch.randn_like(x2[row])
    a, b = prior.predict_eps(x_t, t, condition), prior.predict_eps(x2, t, condition)
    return (a - b).abs().flatten(1).amax(dim=1)


def test_a_view_changes_its_group_and_no_other(prior):
    change = changed_rows(prior, row=5)  # prompt 1, view 1, conditional branch
    assert (change[4:8] > 1e-4).all()  # every view of its group
    assert (change[:4] < 1e-6).all() and (change[8:] < 1e-6).all()  # other prompt, other branch


def test_without_camera_it_is_the_releases_camera_less_call(tiny, prior):
    """The release passes num_frames only with the camera: camera=None means num_frames=1."""
    plain = make_prior(tiny, camera_condition=False)
    x_t, t, condition = distiller_batch(plain)
    with torch.no_grad():
        expected = tiny["unet"](x_t, t, context=condition.tokens, camera=None, num_frames=1)
    torch.testing.assert_close(plain.predict_eps(x_t, t, condition), expected)
    assert (
        plain.predict_eps(x_t, t, condition) - prior.predict_eps(x_t, t, condition)
    ).abs().max() > 1e-4
    change = changed_rows(plain, row=5)
    assert change[5] > 1e-4 and (torch.cat([change[:5], change[6:]]) < 1e-6).all()


def test_one_frame_denoises_every_view_alone_with_its_camera(tiny):
    single = make_prior(tiny, num_views=1)
    cams = mvdream_cameras(2, views_per_prompt=1, view_layout="independent")
    pair = single.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)
    condition = Condition.concat([pair.positive, pair.negative])
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    t = torch.tensor([10, 500, 10, 500])
    with torch.no_grad():
        expected = tiny["unet"](
            x_t, t, context=condition.tokens, camera=camera_codes(cams).repeat(2, 1), num_frames=1
        )
    torch.testing.assert_close(single.predict_eps(x_t, t, condition), expected)


@pytest.mark.parametrize(
    ("options", "tolerance"),
    [({"enable_sdpa": False}, 1e-5), ({"channels_last": True}, 1e-5), ({"dtype": "bf16"}, 0.1)],
    ids=["math_attention", "channels_last", "bf16"],
)
def test_runtime_options_keep_the_prediction(tiny, prior, options, tolerance):
    other = make_prior(tiny, **options)
    x_t, t, condition = distiller_batch(prior, seed=2)
    got = other.predict_eps(x_t, t, condition)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, prior.predict_eps(x_t, t, condition), atol=tolerance, rtol=tolerance
    )


def test_misaligned_groups_are_refused(prior):
    x_t, t, condition = distiller_batch(prior)
    shifted = condition.index(torch.arange(2, 2 + 2 * VIEWS))  # straddles two prompts
    with pytest.raises(ValueError, match=r"rows 0\.\.3 are not the 4 views of one prompt"):
        prior.predict_eps(x_t[:8], t[:8], shifted)
    with pytest.raises(ValueError, match="not whole groups of num_frames=4"):
        prior.predict_eps(x_t[:6], t[:6], condition.index(torch.arange(6)))
    branches = condition.index(torch.tensor([0, 1, 2, 11]))  # same prompt, both branches
    with pytest.raises(ValueError, match="one branch"):
        prior.predict_eps(x_t[:4], t[:4], branches)


def test_cameras_must_come_in_groups_of_num_views(prior):
    cams = mvdream_cameras(2, views_per_prompt=1)
    with pytest.raises(ValueError, match="cameras=mvdream"):
        prior.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)


def test_encode_images_gives_the_unets_latents_and_everything_is_frozen(prior):
    rgb = torch.rand(VIEWS, 3, 12, 12, requires_grad=True)
    z = prior.encode_images(rgb, torch.Generator().manual_seed(0))
    assert z.shape == (VIEWS, 4, LATENT_SIZE, LATENT_SIZE)
    z.sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    assert not any(p.requires_grad for p in prior.parameters())
    assert not prior.training and not prior.unet.training
    assert prior.prediction_type == "epsilon" and prior.view_dependent_prompting is False


# --------------------------------------------------------------------------- camera convention
def official_get_camera(elevation_deg: float, azimuths_deg: list[float]) -> torch.Tensor:
    """The release's ``mvdream.camera_utils.get_camera`` re-derived from its definition: a
    y-up look-at at the origin from ``(cos e sin a, sin e, cos e cos a)``, columns
    ``(right, up, -forward)`` with ``right = forward x (0, 1, 0)``, then ``flip_yz`` (OpenGL ->
    Blender world, ``(x, y, z) -> (x, -z, y)``), flattened row-major."""
    e = math.radians(elevation_deg)
    codes = []
    for azimuth in azimuths_deg:
        a = math.radians(azimuth)
        position = torch.tensor(
            [math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)],
            dtype=torch.float64,
        )
        forward = -position / position.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        right = right / right.norm()
        up = torch.linalg.cross(right, forward)
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, :3] = torch.stack([right, up / up.norm(), -forward], dim=1)
        c2w[:3, 3] = position
        flip_yz = torch.tensor(
            [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64
        )
        codes.append((flip_yz @ c2w).flatten())
    return torch.stack(codes).float()


@pytest.mark.parametrize("elevation", [0.0, 15.0, 30.0])
def test_training_cameras_give_the_official_codes(elevation):
    """Our MVDream training cameras at azimuths 0, 90, 180, 270 (ours: +z up, azimuth 0 on +x)
    are the release's get_camera views at azimuths 90, 180, 270, 360, whatever their distance."""
    cams = mvdream_cameras(
        1, elevation_range_deg=[elevation, elevation], azimuth_range_deg=[0.0, 0.0]
    )
    torch.testing.assert_close(
        torch.rad2deg(cams.azimuth), torch.tensor([0.0, 90.0, -180.0, -90.0]), atol=1e-4, rtol=0
    )
    assert (cams.distance > 1.0).all()  # fov-scaled distances: the codes normalise them away
    expected = official_get_camera(elevation, [90.0, 180.0, 270.0, 360.0])
    torch.testing.assert_close(camera_codes(cams), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- real weights
@pytest.mark.weights
def test_real_mvdream_from_the_hf_cache():
    from huggingface_hub import try_to_load_from_cache

    needed = [
        ("MVDream/MVDream", "sd-v2.1-base-4view.pt"),
        ("stabilityai/stable-diffusion-2-1-base", "vae/config.json"),
    ]
    for repo, filename in needed:
        if not isinstance(try_to_load_from_cache(repo, filename), str):
            pytest.skip(f"{repo}/{filename} is not in the Hugging Face cache")
    real = MVDreamPrior(pretrained=needed[1][0], checkpoint=needed[0][0])
    assert sum(p.numel() for p in real.unet.parameters()) == 867_572_164
    cams = mvdream_cameras(1)
    pair = real.condition(PromptBatch(ids=torch.arange(1), texts=("a hamburger",)), cams)
    z = real.encode_images(torch.rand(VIEWS, 3, 64, 64, device=real.device))
    assert z.shape == (VIEWS, 4, 32, 32)
    eps = real.predict_eps(z, torch.full((VIEWS,), 500, device=real.device), pair.positive)
    assert eps.shape == z.shape and torch.isfinite(eps).all()


# --------------------------------------------------------------------------- bad weights
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_missing_checkpoint_file_is_a_one_line_error(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "sd-v2.1-base-4view.pt"
    with pytest.raises(FileNotFoundError) as excinfo:
        make_prior(tiny, checkpoint=str(missing))
    message = one_line(excinfo)
    assert str(missing) in message and "prior.checkpoint=" in message
    assert "hf download MVDream/MVDream sd-v2.1-base-4view.pt" in message
    with pytest.raises(FileNotFoundError, match="no sd-v2.1-base-4view.pt in"):
        make_prior(tiny, checkpoint=str(tmp_path))


def test_uncached_hub_checkpoint_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as excinfo:
        make_prior(tiny, checkpoint="MVDream/MVDream")
    message = one_line(excinfo)
    assert "MVDream/MVDream" in message and str(tmp_path / "hub") in message
    assert "hf download MVDream/MVDream sd-v2.1-base-4view.pt" in message


def test_hub_checkpoint_resolves_from_the_hf_cache(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--MVDream--MVDream"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(tiny["checkpoint"], repo / "snapshots" / commit / "sd-v2.1-base-4view.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = make_prior(tiny, checkpoint="MVDream/MVDream")
    assert loaded.checkpoint_path.name == "sd-v2.1-base-4view.pt"


@pytest.mark.parametrize(
    ("damage", "needle"),
    [("garbage", "cannot read it"), ("wrong_config", "does not match prior.unet")],
)
def test_malformed_checkpoint_is_a_one_line_error(tiny, tmp_path, damage, needle):
    path = tmp_path / "sd-v2.1-base-4view.pt"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
        kwargs = {}
    else:
        shutil.copy(tiny["checkpoint"], path)
        kwargs = {"unet": {**TINY_UNET_CONFIG, "model_channels": 64}}
    with pytest.raises(ValueError) as excinfo:
        make_prior(tiny, checkpoint=str(path), **kwargs)
    message = one_line(excinfo)
    assert needle in message and str(path) in message and "hf download" in message


def test_missing_sd_parts_and_wrong_schedule_are_one_line_errors(tiny, tmp_path):
    missing = tmp_path / "no_sd"
    with pytest.raises(FileNotFoundError) as excinfo:
        make_prior(tiny, pretrained=str(missing))
    assert "stable-diffusion-2-1-base" in one_line(excinfo)
    sd = shutil.copytree(tiny["pretrained"], tmp_path / "sd")
    config_path = sd / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "beta_schedule": "linear"}))
    with pytest.raises(ValueError) as excinfo:
        make_prior(tiny, pretrained=str(sd))
    assert "MVDream's training schedule" in one_line(excinfo)
    with pytest.raises(ValueError, match=r"prior.unet.context_dim=1024 must equal"):
        make_prior(tiny, unet={**TINY_UNET_CONFIG, "context_dim": 1024})


# --------------------------------------------------------------------------- configs and CLI
def test_the_documented_command_composes_to_mvdream_with_its_cameras(tmp_path):
    from asd3d.prior.mvdream_unet import MVDREAM_SD21_BASE_4VIEW_CONFIG

    from conftest import compose_train

    cfg = compose_train(["generator=3dconv", "prior=mvdream", "corpus=dl17k"], tmp_path / "run")
    assert cfg.prior._target_ == "asd3d.prior.mvdream.MVDreamPrior"
    assert cfg.cameras.views_per_prompt == 4 and cfg.cameras.view_layout == "orbit"
    assert cfg.prior.num_views == 4 and cfg.prior.resolution == 256
    assert cfg.prior.negative_prompt.startswith("ugly, bad anatomy, blurry")
    assert cfg.prior.view_dependent_prompting is False
    assert OmegaConf.to_container(cfg.prior.unet, resolve=True) == MVDREAM_SD21_BASE_4VIEW_CONFIG
    assert cfg.generator.text_dim == cfg.prior.text_dim == 1024
    assert cfg.corpus.name == "dl17k"
    # An explicit camera choice still wins over the prior's.
    sd_cameras = compose_train(["prior=mvdream", "cameras=sd"], tmp_path / "run2")
    assert sd_cameras.cameras.views_per_prompt == 1


def test_train_cli_runs_mvdream_on_dl17k(tiny, tmp_path, shared_corpora):
    """`train.py generator=3dconv prior=mvdream corpus=dl17k` for two steps on the tiny model."""
    from asd3d.io import load_checkpoint

    from cli_helpers import run_entry
    from conftest import TINY

    run_dir = tmp_path / "run"
    # The quickstart shrinks generator and renderer; its procedural-corpus keys are dropped.
    tiny_overrides = [o for o in TINY if not o.startswith("corpus.")]
    result = run_entry(
        "train.py",
        "generator=3dconv_small",  # the command's generator=3dconv at the quickstart's size
        "prior=mvdream",
        "corpus=dl17k",
        *tiny_overrides,
        "distiller=asd",  # the command's default distiller (the quickstart would pick SDS)
        "~corpus.num_prompts",
        "~corpus.num_test_prompts",
        "~corpus.test_split",
        f"prior.pretrained={tiny['pretrained']}",
        f"prior.checkpoint={tiny['checkpoint']}",
        f"prior.text_dim={TEXT_DIM}",
        f"prior.resolution={RESOLUTION}",
        *TINY_UNET_OVERRIDES,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if "unet" in k or k.startswith("prior")]
    config = ckpt["asd3d_config"]
    assert config["prior"]["_target_"] == "asd3d.prior.mvdream.MVDreamPrior"
    assert config["cameras"]["views_per_prompt"] == 4 and config["corpus"]["name"] == "dl17k"
    assert config["distiller"]["_target_"].endswith("ASDDistiller")
