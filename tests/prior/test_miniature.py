"""The miniature prior: its training command trains, resumes and exports a diffusers directory
that ``prior=miniature`` loads through the same code path as SD."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from asd3d.build import build_parts
from asd3d.cameras import CameraSampler
from asd3d.cli import one_line
from asd3d.miniature import evaluation
from asd3d.miniature.evaluation import ddim_sample, ddim_step, ddim_timesteps
from asd3d.miniature.training import run_prior_training, warmup_cosine
from asd3d.prior.miniature import MiniaturePrior, text_code, unet_prediction
from asd3d.prior.schedule import ddpm_alphas_cumprod
from asd3d.types import Condition, PromptBatch
from asd3d.world.text_encoder import ProceduralTextEncoder

from cli_helpers import run_entry
from conftest import CONF, REPO, TINY, compose_train

# A 3-prompt world at 8² and a UNet of a few thousand parameters: seconds per run.
TINY_PRIOR = [
    "corpus.num_prompts=3",
    "corpus.num_test_prompts=3",
    "data.resolution=8",
    "data.views_per_prompt=2",
    "ground_truth.num_samples_stratified=8",
    "ground_truth.num_samples_importance=4",
    "unet.block_out_channels=[8,8,16]",
    "unet.norm_num_groups=4",
    "unet.cross_attention_dim=16",
    "unet.attention_head_dim=2",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.log_every_n_steps=1",
    "train.checkpoint_every_n_steps=1",
    "evaluation.num_cameras=2",
    "evaluation.num_inference_steps=2",
]


def compose_prior(
    overrides: list[str], output_dir: Path, config_name: str = "train_prior"
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[DictConfig, dict]:
    run = tmp_path_factory.mktemp("prior") / "run"
    cfg = compose_prior(TINY_PRIOR, run)
    return cfg, run_prior_training(cfg)


def test_training_exports_a_diffusers_directory_with_log_and_evaluation(trained):
    cfg, result = trained
    export = Path(cfg.export_dir)
    for name in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "miniature.json",
        "train_log.csv",
        "evaluation.json",
        "samples.png",
        "error_curve.csv",
        "error_curve.png",
    ):
        assert (export / name).is_file(), name
    with open(export / "train_log.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2]
    assert result["num_samples"] == 6 and 0.0 <= result["sample_accuracy"] <= 1.0
    with open(export / "error_curve.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["t"]) for row in rows][:2] == [20, 60] and len(rows) == 25
    assert all(float(row["conditional"]) > 0 for row in rows)


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    cfg, _ = trained
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = compose_prior(
        [*TINY_PRIOR, "train.max_steps=3", f"ckpt_path={checkpoint}"], tmp_path / "resumed"
    )
    run_prior_training(resumed)
    with open(Path(resumed.export_dir) / "train_log.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3]


def test_prior_miniature_loads_the_export_and_predicts_noise(trained, tmp_path):
    cfg, _ = trained
    train_cfg = compose_train(
        [*TINY, "prior=miniature", f"prior.pretrained={cfg.export_dir}"], tmp_path / "run"
    )
    prior = build_parts(train_cfg).prior
    assert torch.allclose(prior.alphas_cumprod, ddpm_alphas_cumprod(1000, 0.00085, 0.012))
    assert not any(p.requires_grad for p in prior.parameters())
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180], 2).sample(2)
    pair = prior.condition(PromptBatch(torch.arange(2), ("a red cube", "a blue cone")), cameras)
    rgb = torch.rand(4, 3, 16, 16, requires_grad=True)
    z = prior.encode_images(rgb)  # 16² renders resized to the weights' 8²
    assert z.shape == (4, 3, 8, 8)
    z.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    t = torch.tensor([10, 500, 999, 0])
    eps = prior.predict_eps(z.detach(), t, pair.positive)
    eps_uncond = prior.predict_eps(z.detach(), t, pair.negative)
    assert eps.shape == (4, 3, 8, 8) and not eps.requires_grad
    assert not torch.allclose(eps, eps_uncond)  # the prompt reaches the network
    moved = pair.positive.cameras.c2w.clone()
    moved[:, :3, 3] *= 1.1
    other_view = type(pair.positive)(
        pair.positive.texts,
        pair.positive.unconditional,
        type(cameras)(moved, cameras.fovy, cameras.elevation, cameras.azimuth, cameras.distance),
        pair.positive.tokens,
    )
    assert not torch.allclose(
        eps, prior.predict_eps(z.detach(), t, other_view)
    )  # so does the camera


def test_missing_weights_fail_with_one_line(tmp_path):
    train_cfg = compose_train(
        [*TINY, "prior=miniature", f"prior.pretrained={tmp_path}"], tmp_path / "run"
    )
    with pytest.raises(Exception) as raised:  # Hydra wraps it; the CLI prints the cause
        build_parts(train_cfg)
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    message = one_line(raised.value)
    assert "miniature.json" in message and "train_prior.py" in message and "\n" not in message


def test_command_line_rejects_bad_dropout(tmp_path):
    result = run_entry(
        "train_prior.py", "train.condition_dropout=1.5", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: train.condition_dropout=1.5")


def test_schedules():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    steps = ddim_timesteps(1000, 5)
    assert steps.tolist() == [999, 749, 500, 250, 0]


def test_v_prediction_is_returned_as_noise(trained, tmp_path):
    cfg, _ = trained
    assert cfg.schedule.prediction_type == "v_prediction"
    prior = MiniaturePrior(str(cfg.export_dir))
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(2)
    positive = prior.condition(PromptBatch(torch.arange(2), ("a", "b")), cameras).positive
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        v = unet_prediction(
            prior.unet, x_t, t, positive.tokens, prior.empty_tokens, cameras.c2w, cameras.fovy
        )
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * v + (1 - abar).sqrt() * x_t  # eps from v (REFERENCE.md §2)
    assert torch.allclose(prior.predict_eps(x_t, t, positive), expected, atol=1e-6)


def test_the_unet_sees_the_camera_per_pixel(trained):
    """The UNet's input is the noisy image plus the camera's per-pixel rays (Plücker coordinates
    and the points nearest the origin): the same image seen from another camera gets another
    prediction (the global camera code alone was ignored)."""
    cfg, _ = trained
    prior = MiniaturePrior(str(cfg.export_dir))
    assert prior.unet.config.in_channels == 3 + 9
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(2)
    positive = prior.condition(PromptBatch(torch.arange(2), ("a", "a")), cameras).positive
    x_t, t = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1), torch.tensor([500, 500])
    eps = prior.predict_eps(x_t, t, positive)
    assert not torch.allclose(eps[0], eps[1], atol=1e-4)


def test_text_code_is_the_pooled_vector_and_tells_prompts_apart():
    encoder = ProceduralTextEncoder(dim=64, max_tokens=16)
    texts = [
        "a large brown cube on top of a small yellow cube",
        "a small yellow cube on top of a large brown cube",
        "",
    ]
    embedding = encoder.encode(texts)
    code = text_code(embedding.tokens, encoder.encode([""]).tokens)
    assert torch.allclose(code, embedding.pooled, atol=1e-5)  # the empty prompt's too
    # Swapped words must move the code as much as an unrelated vector would (cosine near 0, not
    # the 0.998 of the padding-dominated mean token state it replaced).
    cosine = torch.nn.functional.cosine_similarity(code[0], code[1], dim=0)
    assert cosine < 0.7


@pytest.mark.parametrize("eps_from_clipped_x0", [True, False])
def test_ddim_sampler_matches_diffusers_ddim_with_v_prediction(
    trained, monkeypatch, eps_from_clipped_x0
):
    """Same model, noise and timesteps: our CFG-on-eps DDIM (x0 clipped) equals diffusers'
    DDIMScheduler stepping on CFG-on-v, down to the final step to abar = 1."""
    from diffusers import DDIMScheduler

    cfg, _ = trained
    prior = MiniaturePrior(str(cfg.export_dir))
    cameras = CameraSampler([1.4, 1.8], [50, 70], [0, 45], [-180, 180]).sample(2)
    pair = prior.condition(PromptBatch(torch.arange(2), ("a red cube", "a blue cone")), cameras)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler.from_pretrained(
        Path(cfg.export_dir) / "scheduler",
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(4)  # 999, 749, 499, 249 -> -1 (abar = 1)
    monkeypatch.setattr(evaluation, "ddim_timesteps", lambda *_: scheduler.timesteps.clone())
    ours = ddim_sample(prior, pair, noise, 7.5, 4, eps_from_clipped_x0)

    both = Condition.concat([pair.positive, pair.negative])
    x = noise
    for t in scheduler.timesteps:
        with torch.no_grad():
            v_cond, v_uncond = unet_prediction(
                prior.unet,
                torch.cat([x, x]),
                t.expand(2 * len(x)),
                both.tokens,
                prior.empty_tokens,
                both.cameras.c2w,
                both.cameras.fovy,
            ).chunk(2)
        v = v_uncond + 7.5 * (v_cond - v_uncond)
        x = scheduler.step(v, t, x, use_clipped_model_output=eps_from_clipped_x0).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


def test_guidance_overshoot_clipped_away_does_not_darken_the_next_step():
    """CFG asks for x0 = 2.3 on a white pixel noised with n; clipped to white, the step must land
    on white noised with the same n at the next level. Keeping the unclipped eps instead moves the
    clipped-off 1.3 into the noise, inverted: the pixel darkens (the 0.00-accuracy samples)."""
    abar = ddpm_alphas_cumprod(1000, 0.00085, 0.012)
    a_t, a_s = abar[999], abar[958]
    n = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_t = a_t.sqrt() + (1.0 - a_t).sqrt() * n
    guided_eps = (x_t - a_t.sqrt() * 2.3) / (1.0 - a_t).sqrt()
    white_at_s = a_s.sqrt() + (1.0 - a_s).sqrt() * n
    assert torch.allclose(ddim_step(x_t, guided_eps, a_t, a_s), white_at_s, atol=1e-5)
    darkened = ddim_step(x_t, guided_eps, a_t, a_s, eps_from_clipped_x0=False)
    assert (darkened < white_at_s - 0.05).all()


def test_evaluate_only_writes_into_its_run_directory_not_over_the_weights(trained, tmp_path):
    """Re-measuring committed weights at other settings must not replace their own record."""
    cfg, _ = trained
    export = Path(cfg.export_dir)
    before = (export / "evaluation.json").read_text()
    run = tmp_path / "remeasure"
    result = run_entry(
        "train_prior.py",
        *TINY_PRIOR,
        f"evaluate_only={export}",
        "evaluation.guidance_scale=3",
        "evaluation.error_curve_points=0",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (export / "evaluation.json").read_text() == before
    assert '"guidance_scale": 3.0' in (run / "evaluation.json").read_text()
    assert (run / "samples.png").is_file()


def test_the_committed_prior_is_the_default_recipe_and_meets_its_target(tmp_path):
    """weights/miniature came from `python train_prior.py` with today's defaults (so the command
    reproduces it) and records a sample accuracy >= 0.95 at CFG 7.5 (issue 6); it loads."""
    weights = REPO / "weights" / "miniature"
    committed = OmegaConf.load(weights / "config.yaml")
    defaults = compose_prior([], tmp_path / "run")
    for section in (
        "corpus",
        "cameras",
        "ground_truth",
        "text_encoder",
        "unet",
        "schedule",
        "train",
    ):
        ours = OmegaConf.to_container(defaults[section], resolve=True)
        assert OmegaConf.to_container(committed[section]) == ours, section
    for key in ("resolution", "views_per_prompt", "seed"):
        assert committed.data[key] == defaults.data[key], key
    assert committed.seed == defaults.seed
    evaluation = json.loads((weights / "evaluation.json").read_text())
    assert evaluation["guidance_scale"] == 7.5 and evaluation["num_samples"] == 128
    assert evaluation["sample_accuracy"] >= 0.95
    assert evaluation["error_curve"]["conditional_decreasing"]
    prior = MiniaturePrior(str(weights))
    assert prior.unet.config.in_channels == 12
