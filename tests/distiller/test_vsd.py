"""VSD: the LoRA / epsilon-net trains, the prior's weights never do, the gradient is
``w(t) (eps_cfg - eps_phi)``, one batched call mixes frozen and adapted rows, and the adapter's
weights survive a checkpoint round trip and a resume (tiny random SD, tests/prior/tiny_sd.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from asd3d.build import build_system
from asd3d.cameras import CameraSampler
from asd3d.checkpoint import AtomicCheckpointIO
from asd3d.distiller.vsd import ResidualParticle, VSDDistiller, vsd_gradient
from asd3d.io import load_checkpoint
from asd3d.prior.lora import ResidualEpsilonNet, UNetLoRA
from asd3d.prior.mvdream_unet import MultiViewUNet
from asd3d.prior.schedule import gather_abar
from asd3d.prior.stable_diffusion import StableDiffusionPrior
from asd3d.types import Condition, PromptBatch

sys.path.insert(0, str(Path(__file__).parents[1] / "prior"))
from tiny_sd import LATENT_SIZE, RESOLUTION, TEXT_DIM, save_tiny_sd  # noqa: E402

from cli_helpers import train  # noqa: E402
from conftest import TINY, bare_trainer, compose_train  # noqa: E402

VSD_YAML = Path(__file__).parents[2] / "conf" / "distiller" / "vsd.yaml"
PROMPTS = ("a red cube", "a small blue sphere on a table")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a busy 2-core machine are far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "eps")


def make_prior(path: Path) -> StableDiffusionPrior:
    """A fresh prior per test: VSD injects its LoRA into the prior's UNet."""
    return StableDiffusionPrior(
        pretrained=str(path), text_dim=TEXT_DIM, resolution=RESOLUTION, dtype="fp32"
    )


def make_vsd(prior=None, **overrides) -> VSDDistiller:
    cfg = OmegaConf.load(VSD_YAML)
    cfg.update(overrides)
    distiller = instantiate(cfg)
    if prior is not None:
        distiller.attach_prior(prior)
    return distiller


def sd_conditions(prior, prompts=PROMPTS):
    cams = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180]).sample(
        len(prompts), generator=torch.Generator().manual_seed(1)
    )
    return prior.condition(PromptBatch(ids=torch.arange(len(prompts)), texts=prompts), cams)


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every trainable weight of the adapter a non-zero random value (B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=g)


# --------------------------------------------------------------------------- gradients
def test_lora_gets_gradients_and_the_prior_base_weights_never_do(tiny_dir):
    prior = make_prior(tiny_dir)
    vsd = make_vsd(prior)
    adapter = vsd.particle.adapter
    assert len(adapter.layers) == 32  # 8 attention blocks x to_q/to_k/to_v/to_out.0
    lora_ids = {id(p) for p in vsd.parameters()}
    base = [p for p in prior.parameters() if id(p) not in lora_ids]
    assert base and not any(p.requires_grad for p in base)
    # Every trainable tensor of the prior's UNet is one of the distiller's (nothing else trains).
    assert {id(p) for p in prior.unet.parameters() if p.requires_grad} <= lora_ids

    z = latents(2).requires_grad_(True)
    out = vsd(
        z,
        sd_conditions(prior),
        prior.predict_eps,
        prior.alphas_cumprod,
        0.3,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    (out.loss + out.aux_loss).backward()
    for name, layer in adapter.layers.items():
        assert layer["B"].weight.grad.abs().sum() > 0, name  # B = 0 at init: A's grad is 0 now
        assert layer["A"].weight.grad is not None, name
    assert adapter.camera_embedding.linear_2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base)
    torch.testing.assert_close(z.grad, out.grad / 2)  # the surrogate reaches z, L_phi does not


def test_lora_trains_in_fp32_on_a_half_precision_unet(tiny_dir):
    """The GPU path runs the UNet in fp16/bf16; the LoRA and camera weights stay fp32."""
    prior = StableDiffusionPrior(
        pretrained=str(tiny_dir), text_dim=TEXT_DIM, resolution=RESOLUTION, dtype="bf16"
    )
    vsd = make_vsd(prior)
    assert {p.dtype for p in vsd.parameters()} == {torch.float32}
    assert next(prior.unet.conv_in.parameters()).dtype == torch.bfloat16
    z = latents(2)
    out = vsd(
        z,
        sd_conditions(prior),
        prior.predict_eps,
        prior.alphas_cumprod,
        0.3,
        generator=torch.Generator().manual_seed(0),
    )
    out.aux_loss.backward()
    assert torch.isfinite(out.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in vsd.parameters())


def test_generator_gradient_is_weighted_cfg_minus_lora_prediction(tiny_dir):
    """Hand setup: chosen t and eps; eps_cfg and eps_lora recomputed with separate calls."""
    prior = make_prior(tiny_dir)
    vsd = make_vsd(prior)
    perturb(vsd.particle)
    conditions = sd_conditions(prior)
    z = latents(2)
    t, eps = torch.tensor([150, 700]), latents(2, seed=3)
    grad, shifted = vsd.gradient(
        z, t, eps, conditions, prior.predict_eps, prior.alphas_cumprod, 20, 1, None
    )
    assert shifted is None

    abar = gather_abar(prior.alphas_cumprod, t)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
    eps_cond = prior.predict_eps(x_t, t, conditions.positive)
    eps_uncond = prior.predict_eps(x_t, t, conditions.negative)
    eps_cfg = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    bare = prior.encode_text(list(PROMPTS)).tokens  # eps_phi sees the prompt without view suffix
    camera = conditions.positive.cameras.flat_matrix()
    with torch.no_grad():
        eps_lora = vsd.particle.eps(
            prior.predict_eps,
            x_t,
            t,
            Condition(PROMPTS, torch.zeros(2, dtype=torch.bool), conditions.positive.cameras, bare),
            camera,
        )
    assert not torch.allclose(eps_lora, eps_cond, atol=1e-4)  # the adapter does act
    torch.testing.assert_close(grad, (1 - abar) * (eps_cfg - eps_lora), atol=1e-5, rtol=1e-4)


def test_vsd_gradient_math_on_hand_values():
    eps_guided = torch.full((2, 1, 1, 1), 3.0)
    eps_particle = torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    weight = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    torch.testing.assert_close(
        vsd_gradient(eps_guided, eps_particle, weight), torch.tensor([1.0, -0.25]).view(2, 1, 1, 1)
    )


# --------------------------------------------------------------------------- one batched call
def test_one_unet_call_mixes_frozen_and_adapted_rows_exactly(tiny_dir):
    prior = make_prior(tiny_dir)
    conditions = sd_conditions(prior)
    z, t, eps = latents(2), torch.tensor([300, 800]), latents(2, seed=5)
    x_t = z  # any input will do
    plain_cond = prior.predict_eps(x_t, t, conditions.positive)

    vsd = make_vsd(prior)
    # Untrained adapter and inactive adapter: exactly the frozen prior.
    torch.testing.assert_close(
        prior.predict_eps(x_t, t, conditions.positive), plain_cond, rtol=0, atol=0
    )
    perturb(vsd.particle)
    torch.testing.assert_close(
        prior.predict_eps(x_t, t, conditions.positive), plain_cond, rtol=0, atol=0
    )

    calls = []

    def counting_predict(x, tt, condition):
        calls.append(len(tt))
        return prior.predict_eps(x, tt, condition)

    grad, _ = vsd.gradient(
        z, t, eps, conditions, counting_predict, prior.alphas_cumprod, 20, 1, None
    )
    assert calls == [6]  # cond + uncond + LoRA rows, one call
    # The mixed call's frozen rows equal a plain call's; its LoRA rows equal an all-LoRA call's.
    abar = gather_abar(prior.alphas_cumprod, t)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
    frozen, particle = vsd.particle.predict(
        prior.predict_eps,
        [_query(x_t, t, conditions.positive)],
        [_query(x_t, t, conditions.positive)],
        [conditions.positive.cameras.flat_matrix()],
    )
    torch.testing.assert_close(frozen[0], prior.predict_eps(x_t, t, conditions.positive))
    with torch.no_grad():
        alone = vsd.particle.eps(
            prior.predict_eps,
            x_t,
            t,
            conditions.positive,
            conditions.positive.cameras.flat_matrix(),
        )
    torch.testing.assert_close(particle[0], alone, atol=1e-5, rtol=1e-4)
    # The camera reaches eps_phi (and only eps_phi).
    other = torch.roll(conditions.positive.cameras.flat_matrix(), 1, dims=0)
    frozen2, particle2 = vsd.particle.predict(
        prior.predict_eps,
        [_query(x_t, t, conditions.positive)],
        [_query(x_t, t, conditions.positive)],
        [other],
    )
    torch.testing.assert_close(frozen2[0], frozen[0], rtol=0, atol=0)
    assert not torch.allclose(particle2[0], particle[0], atol=1e-5)


def _query(x_t, t, condition):
    from asd3d.distiller.base import Query

    return Query(x_t, t, condition)


def test_lora_guidance_scale_adds_uncond_rows_without_camera(tiny_dir):
    prior = make_prior(tiny_dir)
    vsd = make_vsd(prior, particle_guidance_scale=2.0)
    calls = []

    def counting_predict(x, tt, condition):
        calls.append(condition.unconditional.tolist())
        return prior.predict_eps(x, tt, condition)

    vsd.gradient(
        latents(2),
        torch.tensor([100, 200]),
        latents(2, 1),
        sd_conditions(prior),
        counting_predict,
        prior.alphas_cumprod,
        20,
        1,
        None,
    )
    assert calls == [[False, False, True, True, False, False, True, True]]


def test_lora_injects_into_the_mvdream_unet_and_respects_view_groups():
    """MVDream's attention names match; its grouped self-attention takes a per-group mask."""
    torch.manual_seed(0)
    unet = MultiViewUNet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[1],
        num_res_blocks=1,
        channel_mult=[1],
        num_head_channels=16,
        transformer_depth=1,
        context_dim=8,
        use_linear_in_transformer=True,
        camera_dim=16,
    ).requires_grad_(False)
    perturb(unet, seed=1, scale=0.2)  # the release zero-initialises the output convs
    adapter = UNetLoRA(unet, rank=4, alpha=4.0)
    names = list(adapter.layers)
    assert {n.rsplit("-", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0"}
    perturb(adapter)
    x, t = torch.randn(8, 4, 8, 8), torch.full((8,), 500)
    context, camera = torch.randn(8, 5, 8), torch.randn(8, 16)
    frozen = unet(x, t, context=context, camera=camera, num_frames=4)
    rows = torch.tensor([False] * 4 + [True] * 4)
    with adapter.active(rows, torch.randn(8, 16)):
        mixed = unet(x, t, context=context, camera=camera, num_frames=4)
    torch.testing.assert_close(mixed[:4], frozen[:4], rtol=0, atol=0)
    assert not torch.allclose(mixed[4:], frozen[4:], atol=1e-5)
    mixed_groups = torch.tensor([True, False] * 4)
    with (
        adapter.active(mixed_groups, torch.zeros(8, 16)),
        pytest.raises(ValueError, match="mixed inside a view group"),
    ):
        unet(x, t, context=context, camera=camera, num_frames=4)


def test_vsd_on_the_mvdream_prior_keeps_view_groups_and_trains_the_lora(tmp_path):
    """2 prompts x 4 views: one 24-row no-grad call (groups intact), one 8-row training call."""
    from tiny_mvdream import TINY_UNET_CONFIG, save_tiny_mvdream

    from asd3d.prior.mvdream import MVDreamPrior

    tiny = save_tiny_mvdream(tmp_path / "mvdream")
    prior = MVDreamPrior(
        pretrained=str(tiny["pretrained"]),
        checkpoint=str(tiny["checkpoint"]),
        unet=TINY_UNET_CONFIG,
        text_dim=TEXT_DIM,
        resolution=RESOLUTION,
        dtype="fp32",
    )
    vsd = make_vsd(prior)
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "cameras" / "mvdream.yaml")
    cams = instantiate(cfg).sample(2, generator=torch.Generator().manual_seed(0))
    conditions = prior.condition(PromptBatch(ids=torch.arange(2), texts=PROMPTS), cams)
    calls = []
    prior.unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    z = latents(8)
    out = vsd(
        z,
        conditions,
        prior.predict_eps,
        prior.alphas_cumprod,
        0.3,
        group_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [(24, False), (8, True)]
    assert (out.timesteps.view(2, 4) == out.timesteps.view(2, 4)[:, :1]).all()
    out.aux_loss.backward()
    assert all(
        layer["B"].weight.grad.abs().sum() > 0 for layer in vsd.particle.adapter.layers.values()
    )


def test_residual_epsilon_net_starts_as_the_frozen_prediction_and_trains():
    net = ResidualEpsilonNet(hidden=8, embedding_dim=16)
    x, base = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    delta = net(x, base, torch.tensor([1, 500, 999]), torch.randn(3, 16))
    assert delta.shape == x.shape and delta.abs().max() == 0  # zero-initialised output conv
    delta.sum().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("camera_dropout", 1.5, "camera_dropout=1.5"),
        ("lr", 0.0, "lr=0.0"),
        ("particle_timestep_samples", 0, "particle_timestep_samples=0"),
    ],
)
def test_bad_options_are_one_line_errors(key, value, message):
    with pytest.raises(Exception, match=message):  # Hydra wraps the ValueError
        make_vsd(**{key: value})


def test_lora_targets_matching_nothing_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="lora_targets"):
        make_vsd(make_prior(tiny_dir), lora_targets=["no_such_layer"])


# --------------------------------------------------------------------------- checkpoints
def _sd_vsd_cfg(tiny_dir: Path, run_dir: Path):
    return compose_train(
        [
            *TINY,
            "prior=sd21_base",
            "distiller=vsd",
            f"prior.pretrained={tiny_dir}",
            f"prior.text_dim={TEXT_DIM}",
            f"prior.resolution={RESOLUTION}",
            "prior.dtype=fp32",
        ],
        run_dir,
    )


def _adapter_state(system) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in system.state_dict().items() if k.startswith("distiller.")
    }


class _RecordAtTrainStart(pl.Callback):
    def __init__(self):
        self.state = None

    def on_train_start(self, trainer, module):
        self.state = _adapter_state(module)


def test_checkpoint_round_trip_and_resume_keep_the_lora_weights(tiny_dir, tmp_path):
    cfg = _sd_vsd_cfg(tiny_dir, tmp_path / "run")
    system = build_system(cfg, {"note": "vsd test"})
    groups = system.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["generator", "renderer", "distiller"]
    assert groups[2]["lr"] == 1e-4
    trainer = bare_trainer(2, plugins=[AtomicCheckpointIO()])
    trainer.fit(system)
    trained = _adapter_state(system)
    assert trained and not any("unet" in k or k.startswith("prior") for k in system.state_dict())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("B.weight"))

    path = tmp_path / "vsd.ckpt"
    trainer.save_checkpoint(path)
    ckpt = load_checkpoint(path)  # asd3d's safe loader (weights_only=True)
    for key, value in trained.items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=0)
    assert [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [
        "generator",
        "renderer",
        "distiller",
    ]

    resumed = build_system(cfg, {"note": "vsd test"})
    fresh = _adapter_state(resumed)
    assert not all(torch.equal(fresh[k], trained[k]) for k in trained)
    record = _RecordAtTrainStart()
    bare_trainer(3, plugins=[AtomicCheckpointIO()], callbacks=[record]).fit(resumed, ckpt_path=path)
    for key, value in trained.items():
        torch.testing.assert_close(record.state[key], value, rtol=0, atol=0)
    # The loaded weights are the ones inside the resumed prior's UNet (shared modules).
    layer = next(iter(resumed.distiller.particle.adapter.layers.values()))
    unet_b = [m for n, m in resumed.prior.unet.named_modules() if n.endswith("lora_B.vsd")]
    assert any(m is layer["B"] for m in unet_b)


# --------------------------------------------------------------------------- command line
def test_procedural_prior_with_vsd_trains_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "distiller=vsd", "trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert ckpt["asd3d_config"]["distiller"]["_target_"].endswith("VSDDistiller")
    keys = [k for k in ckpt["state_dict"] if k.startswith("distiller.particle.net.")]
    assert keys and not [k for k in ckpt["state_dict"] if k.startswith("prior")]
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/aux_loss" in header.split(",")


def test_procedural_particle_is_the_residual_net(tmp_path):
    from asd3d.build import build_parts

    cfg = compose_train([*TINY, "distiller=vsd"], tmp_path / "run")
    vsd = make_vsd(build_parts(cfg).prior)
    assert isinstance(vsd.particle, ResidualParticle)


@pytest.mark.slow  # ~30 s; the same path runs in-process in the checkpoint test above
def test_sd_prior_with_vsd_trains_from_the_command_line(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "prior=sd21_base",
        "distiller=vsd",
        f"prior.pretrained={tiny_dir}",
        f"prior.text_dim={TEXT_DIM}",
        f"prior.resolution={RESOLUTION}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    lora = [k for k in ckpt["state_dict"] if k.startswith("distiller.particle.adapter.layers.")]
    assert len(lora) == 64  # A and B of 32 projections
    assert not [k for k in ckpt["state_dict"] if "unet" in k or k.startswith("prior")]


@pytest.mark.slow  # two processes (gloo): ~1 min
def test_vsd_trains_under_ddp_without_unused_parameters(tmp_path):
    """Lightning's DDP (find_unused_parameters=False) accepts the distiller's parameters: all
    of them get a gradient every step through L_phi."""
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "distiller=vsd",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert [k for k in ckpt["state_dict"] if k.startswith("distiller.particle.net.")]


@pytest.mark.slow  # ~3-9 min on the shared 2-core machine
def test_vsd_learns_the_procedural_world(tmp_path):
    """Measured (seed 0, 300 steps): R@1 0 -> 1.0, PSNR 15.2 -> 23.0 dB, IoU 0.35 -> 0.65."""
    from test_learning import train_and_score

    before, after = train_and_score(tmp_path, steps=300, extra=["distiller=vsd"])
    assert after["val/psnr"] > before["val/psnr"] + 5.0, (before, after)
    assert after["val/mask_iou"] > before["val/mask_iou"] + 0.2, (before, after)
    assert after["val/oracle_r1"] >= 0.75, (before, after)
