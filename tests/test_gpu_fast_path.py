"""The GPU fast path, checked on the CPU: what a step reads back to the host, camera moves, the
hash-grid backend rule, the prior's dtype choice, grad norms on logging steps, compile, DDP."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

import asd3d
from asd3d import bench_gpu
from asd3d.build import build_system, quiet_cpu_trainer
from asd3d.cameras import CameraSampler, move_cameras
from asd3d.generator import hashgrid
from asd3d.generator.hashgrid import HashGridEncoding
from asd3d.prior.stable_diffusion import resolve_dtype

PACKAGE = str(Path(asd3d.__file__).parent)
# Calls that read a tensor back to Python (each a device sync on a GPU), or copy a Python
# constant to the device (new_tensor: a blocking host-to-device copy).
READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "new_tensor")
# The only places a step may make them: all read host tensors (the cameras' host angles; the
# MVDream group check's flags, which on a GPU are checked by an asynchronous device assert).
HOST_SITES = {
    ("cpu", "view_prompts.py", "_degrees"),
    ("tolist", "view_prompts.py", "view_directions"),
    ("tolist", "view_prompts.py", "perp_neg_views"),
    ("tolist", "mvdream.py", "check_view_groups"),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Tiny random SD 2.1-base and MVDream weights and a prompt library, as bench_gpu makes."""
    root = tmp_path_factory.mktemp("bench")
    bench_gpu.write_prompt_library(root / "prompts.json")
    bench_gpu.write_random_sd(root / "sd21_base", "tiny", torch.device("cpu"))
    bench_gpu.write_random_mvdream(root / "mvdream.safetensors", "tiny", torch.device("cpu"))
    return root


class ReadBackAudit(pl.Callback):
    """Counts, per call site inside asd3d, the read-backs made during training batches."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self._saved: dict[str, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for name in READ_BACKS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(PACKAGE):
                    self.calls[(_name, Path(caller.co_filename).name, caller.co_name)] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("recipe", bench_gpu.RECIPES)
def test_a_training_step_reads_back_only_host_data(recipe, scratch):
    cfg = bench_gpu.compose(recipe, ["trainer.accumulate_grad_batches=1"], scratch, "tiny")
    audit = ReadBackAudit()
    trainer = quiet_cpu_trainer(2, callbacks=[audit], log_every_n_steps=1000)
    try:
        trainer.fit(build_system(cfg, {}))
    finally:
        audit.on_train_batch_end(None, None, None, None, 0)
    unexpected = {site: n for site, n in audit.calls.items() if site not in HOST_SITES}
    assert not unexpected, f"read-backs in the hot path: {unexpected}"


def test_cameras_move_in_one_block_and_keep_host_angles():
    sampler = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180], views_per_prompt=4)
    host = sampler.sample(2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(host.host_angles[1], host.azimuth, rtol=0, atol=0)
    moved = move_cameras(host, "meta")
    assert moved.c2w.device.type == "meta" and moved.c2w.shape == (8, 4, 4)
    assert moved.fovy.shape == moved.azimuth.shape == (8,)
    assert moved.views_per_prompt == 4
    elevation, azimuth = moved.angles_on_host()  # no device read: the host copy
    assert elevation is host.elevation and azimuth is host.azimuth
    assert moved.index(torch.arange(2)).host_angles is None  # an index drops the stale copy


def test_hash_grid_auto_on_cuda_without_tinycudann_names_the_opt_in(monkeypatch):
    monkeypatch.setattr(hashgrid, "tcnn_available", lambda: False)
    grid = HashGridEncoding(2, 2, 8, 4, 2.0)
    with pytest.raises(ValueError, match=r"generator\.grid_backend=torch"):
        grid.resolve_backend(torch.device("cuda"))
    assert grid.resolve_backend(torch.device("cpu")) == "torch"
    grid.backend = "torch"  # the explicit opt-in
    assert grid.resolve_backend(torch.device("cuda")) == "torch"


def test_dtype_auto_is_fp16_only_when_the_run_goes_to_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto", "auto") == torch.float16
    assert resolve_dtype("auto", "gpu") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "auto") == torch.float32


def test_fp16_prior_runs_its_vae_encoder_in_bf16_with_a_finite_gradient(scratch):
    from asd3d.prior.stable_diffusion import StableDiffusionPrior

    prior = StableDiffusionPrior(
        str(scratch / "sd21_base"), text_dim=bench_gpu.TINY_TEXT_DIM, resolution=16, dtype="fp16"
    )
    assert prior.model_dtype == torch.float16 and prior.vae.dtype == torch.bfloat16
    rgb = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = prior.encode_images(rgb, generator=torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32
    latents.square().mean().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_generator_grad_norm_is_computed_on_logging_steps_only(monkeypatch, tiny_cfg):
    calls = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda t: calls.append(1) or foreach_norm(t))
    trainer = quiet_cpu_trainer(4, log_every_n_steps=2)
    trainer.fit(build_system(tiny_cfg, {}))
    assert len(calls) == 2
    assert "train/grad_norm_generator" in trainer.callback_metrics


def test_compile_wraps_generator_and_denoiser_in_place(scratch):
    cfg = bench_gpu.compose("df415_3dconv_sd", ["system.compile=true"], scratch, "tiny")
    system = build_system(cfg, {})
    keys = list(system.state_dict())
    system.setup("fit")
    assert system.generator._compiled_call_impl is not None
    assert system.prior.unet._compiled_call_impl is not None
    assert list(system.state_dict()) == keys  # checkpoints keep their parameter names


def test_ddp_strategy_uses_bucket_views_and_a_static_graph(tmp_path):
    from conftest import compose_train

    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True, "static_graph": True}
