"""The Stable Diffusion prior does what diffusers' own components do, on tiny random weights.

The tiny model (tests/prior/tiny_sd.py) is saved in the Hub's diffusers layout once per session
and loaded back through the prior's real loading path, so nothing here needs real weights.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from asd3d.prior.schedule import gather_abar
from asd3d.prior.stable_diffusion import StableDiffusionPrior
from asd3d.prior.view_prompts import view_dependent_texts, view_directions
from asd3d.types import Cameras, Condition, PromptBatch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd import LATENT_SIZE, RESOLUTION, TEXT_DIM, save_tiny_sd, tiny_components  # noqa: E402

PROMPTS = ("a red cube", "a small blue sphere on a table")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a busy 2-core machine run ~100x slower with 2 threads (spin-waiting
    on a contended core) than with 1; conftest's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Tiny components in memory plus their saved eps- and v-prediction directories."""
    root = tmp_path_factory.mktemp("tiny_sd")
    components = tiny_components(seed=0)
    return {
        "components": components,
        "eps": save_tiny_sd(root / "eps", "epsilon", components),
        "v": save_tiny_sd(root / "v", "v_prediction", components),
    }


def make_prior(path: Path, **kwargs) -> StableDiffusionPrior:
    options = {"text_dim": TEXT_DIM, "resolution": RESOLUTION, "dtype": "fp32", **kwargs}
    return StableDiffusionPrior(pretrained=str(path), **options)


@pytest.fixture(scope="session")
def prior(tiny) -> StableDiffusionPrior:
    return make_prior(tiny["eps"])


@pytest.fixture(scope="session")
def v_prior(tiny) -> StableDiffusionPrior:
    return make_prior(tiny["v"])


def cameras(azimuth_deg: list[float], elevation_deg: list[float], views: int) -> Cameras:
    n = len(azimuth_deg)
    return Cameras(
        c2w=torch.eye(4).expand(n, 4, 4).clone(),
        fovy=torch.full((n,), math.radians(50.0)),
        elevation=torch.deg2rad(torch.tensor(elevation_deg)),
        azimuth=torch.deg2rad(torch.tensor(azimuth_deg)),
        distance=torch.full((n,), 1.5),
        views_per_prompt=views,
    )


def batch_inputs(prior, seed=0):
    """A distiller-like batched query: both branches, mixed timesteps, random latents."""
    g = torch.Generator().manual_seed(seed)
    cams = cameras([0.0, 90.0, 180.0, -45.0], [10.0, 20.0, 70.0, 0.0], views=2)
    pair = prior.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)
    condition = Condition.concat([pair.positive, pair.negative])
    x_t = torch.randn(len(condition), 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    t = torch.randint(0, 1000, (len(condition),), generator=g)
    return x_t, t, condition


# --------------------------------------------------------------------------- denoiser
def test_eps_prediction_is_one_direct_unet_call(prior, tiny):
    x_t, t, condition = batch_inputs(prior)
    expected = tiny["components"]["unet"](x_t, t, encoder_hidden_states=condition.tokens).sample
    got = prior.predict_eps(x_t, t, condition)
    assert got.dtype == torch.float32 and got.shape == x_t.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_v_prediction_is_converted_to_eps(v_prior, tiny):
    assert v_prior.prediction_type == "v_prediction"
    x_t, t, condition = batch_inputs(v_prior)
    v = tiny["components"]["unet"](x_t, t, encoder_hidden_states=condition.tokens).sample
    abar = gather_abar(v_prior.alphas_cumprod, t)
    torch.testing.assert_close(
        v_prior.predict_eps(x_t, t, condition),
        abar.sqrt() * v + (1 - abar).sqrt() * x_t,
        atol=1e-5,
        rtol=1e-4,
    )


def test_a_perfect_v_model_yields_the_true_noise(tiny, monkeypatch):
    """With a UNet returning the exact v target, predict_eps recovers the injected eps."""
    v_prior = make_prior(tiny["v"])
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(2, 6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    abar = gather_abar(v_prior.alphas_cumprod, t)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z

    class PerfectV(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return type("Out", (), {"sample": v})()

    monkeypatch.setattr(v_prior, "unet", PerfectV())
    condition = Condition(
        ("x",) * 6,
        torch.zeros(6, dtype=torch.bool),
        cameras([0.0] * 6, [0.0] * 6, 1),
        torch.zeros(6, 77, TEXT_DIM),
    )
    torch.testing.assert_close(v_prior.predict_eps(x_t, t, condition), eps, atol=1e-5, rtol=1e-4)


def test_schedule_and_prediction_type_come_from_the_scheduler_config(prior):
    assert prior.prediction_type == "epsilon"
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


# --------------------------------------------------------------------------- images
def test_encode_images_is_the_scaled_vae_posterior_sample_and_differentiable(prior, tiny):
    rgb = torch.rand(3, 3, 12, 12, requires_grad=True)  # resized to 16 inside
    latents = prior.encode_images(rgb, generator=torch.Generator().manual_seed(3))
    assert latents.shape == (3, 4, LATENT_SIZE, LATENT_SIZE) and latents.dtype == torch.float32

    vae = tiny["components"]["vae"]
    x = F.interpolate(rgb.detach(), size=(RESOLUTION,) * 2, mode="bilinear", align_corners=False)
    posterior = vae.encode(2 * x - 1).latent_dist
    expected = posterior.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    torch.testing.assert_close(latents.detach(), expected.detach(), atol=1e-5, rtol=1e-4)

    latents.square().sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


# --------------------------------------------------------------------------- text
def test_encode_text_matches_the_text_encoder_at_fp16_precision(prior, tiny):
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    embedding = prior.encode_text(texts)
    assert embedding.tokens.shape == (3, 77, TEXT_DIM) and embedding.pooled.shape == (3, TEXT_DIM)
    assert embedding.tokens.dtype == torch.float32
    torch.testing.assert_close(embedding.tokens[0], embedding.tokens[2], atol=0, rtol=0)

    tokenizer = tiny["components"]["tokenizer"]
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = tiny["components"]["text_encoder"](ids).last_hidden_state
    torch.testing.assert_close(embedding.tokens, hidden.half().float(), atol=0, rtol=0)
    eos = [row.tolist().index(tokenizer.eos_token_id) for row in ids]
    pooled = torch.stack([hidden[i, eos[i]] for i in range(3)])
    torch.testing.assert_close(embedding.pooled, pooled.half().float(), atol=0, rtol=0)


def test_text_cache_is_a_bounded_lru(tiny):
    small = make_prior(tiny["eps"], text_cache_size=3)
    texts = [f"prompt number {i}" for i in range(5)]
    first = small.encode_text(texts)  # more texts than the cache holds, in one call
    assert list(small._text_cache) == texts[2:]
    small.encode_text([texts[2]])  # touch: now the most recent
    small.encode_text(["another prompt"])
    assert list(small._text_cache) == [texts[4], texts[2], "another prompt"]
    again = small.encode_text(texts)  # evicted texts are re-encoded to the same values
    torch.testing.assert_close(again.tokens, first.tokens, atol=0, rtol=0)
    assert len(small._text_cache) == 3
    assert all(
        v[0].dtype == torch.float16 and v[0].device.type == "cpu"
        for v in small._text_cache.values()
    )


# --------------------------------------------------------------------------- conditions
@pytest.mark.parametrize(
    ("azimuth", "elevation", "direction"),
    [
        (0.0, 0.0, "front"),
        (29.0, 45.0, "front"),
        (-29.0, 0.0, "front"),
        (350.0, 0.0, "front"),
        (30.0, 0.0, "side"),
        (90.0, 0.0, "side"),
        (-150.0, 0.0, "side"),
        (151.0, 0.0, "back"),
        (-179.0, 0.0, "back"),
        (180.0, 0.0, "back"),
        (0.0, 60.0, "front"),
        (180.0, 61.0, "overhead"),
        (90.0, 89.0, "overhead"),
    ],
)
def test_view_directions(azimuth, elevation, direction):
    assert view_directions(
        torch.deg2rad(torch.tensor([azimuth])), torch.deg2rad(torch.tensor([elevation]))
    ) == [direction]


def test_condition_uses_view_suffixes_and_the_negative_prompt(tiny):
    vd_prior = make_prior(tiny["eps"], negative_prompt="blurry")
    cams = cameras([0.0, 90.0, 180.0, -45.0], [10.0, 20.0, 70.0, 0.0], views=2)
    pair = vd_prior.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)
    suffixed = view_dependent_texts(PROMPTS, cams.azimuth, cams.elevation)
    assert suffixed == [
        "a red cube, front view",
        "a red cube, side view",
        f"{PROMPTS[1]}, overhead view",
        f"{PROMPTS[1]}, side view",
    ]
    assert pair.positive.texts == pair.negative.texts == (PROMPTS[0],) * 2 + (PROMPTS[1],) * 2
    assert not pair.positive.unconditional.any() and pair.negative.unconditional.all()
    torch.testing.assert_close(pair.positive.tokens, vd_prior.encode_text(suffixed).tokens)
    torch.testing.assert_close(
        pair.negative.tokens, vd_prior.encode_text(["blurry"]).tokens.expand(4, -1, -1)
    )

    plain = make_prior(tiny["eps"], view_dependent_prompting=False)
    pair = plain.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)
    torch.testing.assert_close(
        pair.positive.tokens, plain.encode_text(list(pair.positive.texts)).tokens
    )


# --------------------------------------------------------------------------- loading
def test_everything_is_frozen(prior):
    params = list(prior.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not prior.training and not prior.unet.training and not prior.text_encoder.training


@pytest.mark.parametrize(
    "options", [{"enable_sdpa": False}, {"channels_last": True}, {"dtype": "bf16"}]
)
def test_runtime_options_keep_the_prediction(prior, tiny, options):
    variant = make_prior(tiny["eps"], **options)
    x_t, t, condition = batch_inputs(prior)
    tol = 5e-2 if options.get("dtype") == "bf16" else 1e-4
    got = variant.predict_eps(x_t, t, condition)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, prior.predict_eps(x_t, t, condition), atol=tol, rtol=tol)


def test_predictions_ignore_the_trainers_autocast(prior):
    x_t, t, condition = batch_inputs(prior)
    reference = prior.predict_eps(x_t, t, condition)
    rgb = torch.rand(2, 3, RESOLUTION, RESOLUTION)
    latents = prior.encode_images(rgb, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(prior.predict_eps(x_t, t, condition), reference, atol=0, rtol=0)
        again = prior.encode_images(rgb, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, latents, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_dtype_runs_fp16_on_cuda(prior, tiny):
    gpu = make_prior(tiny["eps"], dtype="auto", channels_last=True).to("cuda")
    assert gpu.unet.dtype == torch.float16 and gpu.alphas_cumprod.dtype == torch.float32
    x_t, t, condition = batch_inputs(prior)
    got = gpu.predict_eps(x_t.cuda(), t.cuda(), condition)
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    torch.testing.assert_close(
        got.cpu(), prior.predict_eps(x_t, t, condition), atol=2e-2, rtol=2e-2
    )
    rgb = torch.rand(2, 3, 12, 12, device="cuda", requires_grad=True)
    gpu.encode_images(rgb, torch.Generator("cuda").manual_seed(0)).sum().backward()
    assert rgb.grad.dtype == torch.float32 and torch.isfinite(rgb.grad).all()


@pytest.mark.weights
def test_real_sd21_base_from_the_hf_cache():
    from huggingface_hub import try_to_load_from_cache

    repo = "stabilityai/stable-diffusion-2-1-base"
    if not isinstance(try_to_load_from_cache(repo, "unet/config.json"), str):
        pytest.skip(f"{repo} is not in the Hugging Face cache")
    real = StableDiffusionPrior(pretrained=repo, resolution=512)
    embedding = real.encode_text(["a hamburger"])
    assert embedding.tokens.shape == (1, 77, 1024) and embedding.pooled.shape == (1, 1024)
    assert real.prediction_type == "epsilon" and real.vae.config.scaling_factor == 0.18215


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_missing_directory_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "sd21"
    with pytest.raises(FileNotFoundError) as excinfo:
        StableDiffusionPrior(pretrained=str(missing))
    message = one_line_error(excinfo)
    assert str(missing) in message and "hf download" in message
    assert "prior.pretrained=" in message


def test_uncached_hub_id_is_a_one_line_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as excinfo:
        StableDiffusionPrior(pretrained="stabilityai/stable-diffusion-2-1-base")
    message = one_line_error(excinfo)
    assert "stabilityai/stable-diffusion-2-1-base" in message and str(tmp_path / "hub") in message


def test_hub_id_resolves_from_the_hf_cache(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny--sd21"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny["v"], repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = StableDiffusionPrior(pretrained="tiny/sd21", text_dim=TEXT_DIM, dtype="fp32")
    assert loaded.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("damage", "error", "names"),
    [
        ("unet/diffusion_pytorch_model.safetensors", FileNotFoundError, "'unet'"),
        ("tokenizer", FileNotFoundError, "'tokenizer'"),
        ("scheduler/scheduler_config.json", FileNotFoundError, "'scheduler'"),
        ("vae/config.json=garbage", ValueError, "vae"),
        ("text_encoder/model.safetensors=garbage", ValueError, "text_encoder"),
    ],
)
def test_damaged_directory_is_a_one_line_error(tiny, tmp_path, damage, error, names):
    root = shutil.copytree(tiny["eps"], tmp_path / "sd")
    target, _, content = damage.partition("=")
    if content:
        (root / target).write_text(content)
    elif (root / target).is_dir():
        shutil.rmtree(root / target)
    else:
        (root / target).unlink()
    with pytest.raises(error) as excinfo:
        make_prior(root)
    message = one_line_error(excinfo)
    assert names in message and str(root) in message and "hf download" in message


def test_text_dim_mismatch_is_a_one_line_error(tiny):
    with pytest.raises(ValueError) as excinfo:
        make_prior(tiny["eps"], text_dim=1024)
    assert "prior.text_dim=32" in one_line_error(excinfo)


def test_bad_dtype_is_rejected_before_loading(tmp_path):
    with pytest.raises(ValueError, match="prior.dtype='fp8'"):
        StableDiffusionPrior(pretrained=str(tmp_path / "missing"), dtype="fp8")


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("name", "pretrained", "resolution"),
    [
        ("sd21_base", "stabilityai/stable-diffusion-2-1-base", 512),
        ("sd21", "stabilityai/stable-diffusion-2-1", 768),
    ],
)
def test_configs_compose_to_the_prior(tmp_path, name, pretrained, resolution):
    from conftest import TINY, compose_train

    cfg = compose_train([*TINY, f"prior={name}"], tmp_path / "run")
    assert cfg.prior._target_ == "asd3d.prior.stable_diffusion.StableDiffusionPrior"
    assert cfg.prior.pretrained == pretrained and cfg.prior.resolution == resolution
    assert cfg.prior.text_dim == 1024 and cfg.prior.negative_prompt == ""
    assert cfg.prior.view_dependent_prompting is True


def test_train_cli_runs_with_the_tiny_sd_prior(tiny, tmp_path):
    """Two training steps through train.py on CPU; the prior's weights stay out of checkpoints."""
    from asd3d.io import load_checkpoint

    from cli_helpers import train

    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "prior=sd21_base",
        f"prior.pretrained={tiny['eps']}",
        f"prior.text_dim={TEXT_DIM}",
        f"prior.resolution={RESOLUTION}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if "unet" in k or k.startswith("prior")]
    assert json.dumps(ckpt["asd3d_config"]["prior"]).count("StableDiffusionPrior") == 1
