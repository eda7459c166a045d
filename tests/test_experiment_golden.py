"""The released recipes (``conf/experiment/<name>.yaml``) against golden snapshots and the paper.

Three checks per experiment:

* golden: the resolved job config (what ``python train.py experiment=<name> --cfg job --resolve``
  prints, with machine paths replaced by fixed placeholders) equals ``tests/golden/<name>.yaml``,
  so any drift of a default that reaches a paper recipe shows up in review as a snapshot diff.
  After an intended change: ``UPDATE_GOLDEN=1 pytest tests/test_experiment_golden.py``.
* recipe: the settings that define the release's row (REFERENCE.md §8 and the release's YAMLs)
  hold, independently of the snapshot, so regenerating snapshots cannot hide a broken recipe.
* size: the full-size generator + renderer, built on the meta device (no memory, no init cost),
  have the release's parameter count within 2% (REFERENCE.md §3).
* trains: each recipe, with the procedural prior standing in for SD / MVDream (no weights here)
  and its generator shrunk, takes two optimizer steps -- so the recipe's own deltas (optimizer,
  regulariser weights, background, resolution milestones, accumulation) run together.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from asd3d.build import build_system, compose_train_config, quiet_cpu_trainer

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
EXPERIMENTS_DIR = REPO / "conf" / "experiment"
UPDATE_HINT = "UPDATE_GOLDEN=1 pytest tests/test_experiment_golden.py"

# Machine-independent stand-ins for the paths a real run resolves from its environment.
ROOT_PLACEHOLDER = "/asd3d"
OUTPUT_PLACEHOLDER = "/asd3d/outputs/train/runs/RUN"
CORPORA_PLACEHOLDER = "/asd3d/data/corpora"

# Exact release counts of geometry + background + renderer state (REFERENCE.md §3).
PARAMS_3DCONV_M1 = 88_687_372
PARAMS_3DCONV_M2 = 144_798_604
PARAMS_TRIPLANE = 120_564_929
PARAMS_HYPER_INGP = 13_290_801

ADAM = {"_target_": "torch.optim.Adam", "betas": [0.0, 0.99]}
ADAN = {"_target_": "timm.optim.Adan", "betas": [0.98, 0.92, 0.99], "eps": 1.0e-15}

# The settings that make each experiment the release's recipe: dotted config key -> value.
RECIPES: dict[str, dict[str, Any]] = {
    "mg15_hyperingp_sd": {
        "corpus.name": "mg15",
        "generator._target_": "asd3d.generator.hyper_ingp.HyperINGPGenerator",
        "generator.spectral_norm": False,
        "generator.sphere_bias_radius": 0.5,
        "renderer.background._target_": "asd3d.renderer.background.TextConditionedBackground",
        "renderer.background.per_level_scale": 1.0,
        "renderer.background_augmentation_prob": 0.2,
        "prior.pretrained": "stabilityai/stable-diffusion-2-1-base",
        "prior.perp_neg": True,
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "distiller.guidance_scale": 7.5,
        "distiller.eta": 0.1,
        "optimizer": ADAM,
        "system.lr_generator": 4.0e-3,
        "system.lr_renderer": 1.0e-3,
        "system.render_resolution": 64,
        "system.prompts_per_step": 1,
        "trainer.max_steps": 50_000,
        "trainer.devices": 1,
        "trainer.precision": "32-true",
    },
    "df415_3dconv_sd": {
        "corpus.name": "df415",
        "generator._target_": "asd3d.generator.conv3d.ThreeDConvGenerator",
        "generator.channels.32": 256,
        "prior.pretrained": "stabilityai/stable-diffusion-2-1-base",
        "prior.perp_neg": True,
        "prior.negative_prompt": "",
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "distiller.guidance_scale": 7.5,
        "distiller.eta": 0.1,
        "optimizer": ADAM,
        "system.lr_generator": 4.0e-3,
        "system.lr_renderer": 1.0e-3,
        "system.render_resolution": 64,
        "system.prompts_per_step": 1,
        "system.validation.distance": 1.2,
        "cameras.views_per_prompt": 1,
        "renderer.background_augmentation_prob": 0.5,
        "trainer.max_steps": 100_000,
        "trainer.devices": 1,
        "trainer.accumulate_grad_batches": 1,
        "trainer.precision": "32-true",
    },
    "at2520_3dconv_sd": {
        "corpus.name": "at2520",
        "generator._target_": "asd3d.generator.conv3d.ThreeDConvGenerator",
        "generator.channels.32": 256,
        "prior.pretrained": "stabilityai/stable-diffusion-2-1-base",
        "prior.perp_neg": True,
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "optimizer": ADAM,
        "system.lr_generator": 4.0e-3,
        "system.lr_renderer": 1.0e-3,
        "system.render_resolution": 64,
        "system.validation.distance": 1.5,
        "renderer.background_augmentation_prob": 0.5,
        "trainer.max_steps": 50_000,
        "trainer.devices": 1,
        "trainer.precision": "32-true",
    },
    "cp100k_3dconv_sd": {
        "corpus.name": "cp100k",
        "generator._target_": "asd3d.generator.conv3d.ThreeDConvGenerator",
        "generator.channels.32": 512,
        "generator.channels.128": 128,
        "prior.pretrained": "stabilityai/stable-diffusion-2-1-base",
        "prior.perp_neg": True,
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "optimizer": ADAN,
        "system.lr_generator": 4.0e-3,
        "system.lr_renderer": 1.0e-3,
        "system.prompts_per_step": 1,
        "trainer.max_steps": 300_000,
        "trainer.strategy._target_": "pytorch_lightning.strategies.DDPStrategy",
        "trainer.devices": 8,
        "trainer.accumulate_grad_batches": 1,
        "trainer.precision": "32-true",
    },
    "dl17k_triplane_mvdream": {
        "corpus.name": "dl17k",
        "generator._target_": "asd3d.generator.triplane.TriplaneTransformerGenerator",
        "prior._target_": "asd3d.prior.mvdream.MVDreamPrior",
        "prior.checkpoint_file": "sd-v2.1-base-4view.pt",
        "prior.view_dependent_prompting": False,
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "distiller.guidance_scale": 7.5,
        "distiller.eta": 0.1,
        "cameras.views_per_prompt": 4,
        "cameras.fovy_range_deg": [15.0, 60.0],
        "optimizer": ADAN,
        "system.lr_generator": 2.0e-4,
        "system.lr_renderer": 2.0e-4,
        "system.prompts_per_step": 1,
        "system.render_resolution": 64,
        "system.regularisers.opaqueness.end": 1.0,
        "system.regularisers.eikonal": 0.01,
        "system.validation.distance": 3.0,
        "system.validation.fovy_deg": 40.0,
        "renderer.background_augmentation_prob": 0.0,
        "trainer.max_steps": 100_000,
        "trainer.strategy._target_": "pytorch_lightning.strategies.DDPStrategy",
        "trainer.devices": 8,
        "trainer.accumulate_grad_batches": 2,
        "trainer.precision": "32-true",
    },
    "dl17k_triplane_mvdream_1gpu": {
        "corpus.name": "dl17k",
        "generator._target_": "asd3d.generator.triplane.TriplaneTransformerGenerator",
        "prior._target_": "asd3d.prior.mvdream.MVDreamPrior",
        "cameras.views_per_prompt": 4,
        "optimizer": ADAN,
        "system.lr_generator": 2.0e-4,
        "system.regularisers.eikonal": 0.01,
        "renderer.background_augmentation_prob": 0.0,
        "trainer.max_steps": 50_000,
        "trainer.devices": 1,
        "trainer.accumulate_grad_batches": 8,
        "trainer.precision": "32-true",
    },
    "ingp_sd": {
        "corpus.num_prompts": 1,
        "generator._target_": "asd3d.generator.ingp.INGPGenerator",
        "renderer._target_": "asd3d.renderer.nerf.NeRFRenderer",
        "renderer.background_augmentation_prob": 0.5,
        "prior.pretrained": "stabilityai/stable-diffusion-2-1-base",
        "prior.perp_neg": True,
        "distiller._target_": "asd3d.distiller.asd.ASDDistiller",
        "cameras.views_per_prompt": 1,
        "optimizer": {"_target_": "torch.optim.AdamW", "betas": [0.0, 0.99], "eps": 1.0e-15},
        "system.render_resolution": {0: 64, 0.4: 256},
        "system.lr_generator": 1.0e-2,
        "system.regularisers.sparsity.value": 30.0,
        "system.regularisers.opaqueness.end": 100.0,
        "system.regularisers.eikonal": 0.0,
        "system.validation.distance": 1.2,
        "trainer.max_steps": 25_000,
        "trainer.devices": 1,
        "trainer.precision": "32-true",
    },
    "ingp_mvdream": {
        "corpus.num_prompts": 1,
        "generator._target_": "asd3d.generator.ingp.INGPGenerator",
        "renderer._target_": "asd3d.renderer.nerf.NeRFRenderer",
        "prior._target_": "asd3d.prior.mvdream.MVDreamPrior",
        "cameras.views_per_prompt": 4,
        "optimizer": {"_target_": "torch.optim.AdamW", "betas": [0.0, 0.99], "eps": 1.0e-15},
        "system.render_resolution": {0: 64, 0.4: 256},
        "system.lr_generator": 3.0e-3,
        "system.lr_renderer": 3.0e-3,
        "system.regularisers.sparsity.value": 20.0,
        "system.regularisers.opaqueness.end": 100.0,
        "system.regularisers.eikonal": 0.0,
        "system.validation.distance": 3.0,
        "system.validation.fovy_deg": 40.0,
        "trainer.max_steps": 25_000,
        "trainer.devices": 1,
        "trainer.precision": "32-true",
    },
}

# Expected full-size parameter count of generator + renderer per experiment (None: no
# published count, the parts are still built on the meta device).
PARAMETERS: dict[str, int | None] = {
    "mg15_hyperingp_sd": PARAMS_HYPER_INGP,
    "df415_3dconv_sd": PARAMS_3DCONV_M1,
    "at2520_3dconv_sd": PARAMS_3DCONV_M1,
    "cp100k_3dconv_sd": PARAMS_3DCONV_M2,
    "dl17k_triplane_mvdream": PARAMS_TRIPLANE,
    "dl17k_triplane_mvdream_1gpu": PARAMS_TRIPLANE,
    "ingp_sd": None,
    "ingp_mvdream": None,
}

# The prompt-specific experiments require a corpus of one prompt; snapshots use the procedural
# one (offline).
ONE_PROMPT = ["corpus=procedural", "corpus.num_prompts=1", "corpus.num_test_prompts=1"]
EXTRA_OVERRIDES: dict[str, list[str]] = {"ingp_sd": ONE_PROMPT, "ingp_mvdream": ONE_PROMPT}

EXPERIMENTS = sorted(RECIPES)


def command_overrides(experiment: str) -> list[str]:
    return [f"experiment={experiment}", *EXTRA_OVERRIDES.get(experiment, [])]


@functools.cache
def resolved_job_config(experiment: str) -> DictConfig:
    """The composed config of ``experiment=<name>`` as ``--cfg job`` shows it, paths normalised.

    Cached: composing takes ~0.3 s and every test only reads the result.
    """
    cfg = compose_train_config(
        command_overrides(experiment),
        output_dir=Path(OUTPUT_PLACEHOLDER),
        corpora_dir=Path(CORPORA_PLACEHOLDER),
    )
    with open_dict(cfg):
        cfg.paths.root_dir = ROOT_PLACEHOLDER
        del cfg["hydra"]  # --cfg job leaves Hydra's own config out
    return cfg


def snapshot_text(experiment: str, cfg: DictConfig) -> str:
    command = " ".join(command_overrides(experiment))
    header = (
        f"# Golden resolved config of `python train.py {command} --cfg job --resolve`\n"
        f"# (paths replaced by placeholders). Regenerate after an intended change: {UPDATE_HINT}\n"
    )
    return header + OmegaConf.to_yaml(cfg, resolve=True)


def lookup(config: dict[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; integer keys (the 3DConv channel table) as ints."""
    node: Any = config
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() and int(part) in node else node[part]
    return node


def test_every_released_experiment_is_covered():
    on_disk = {p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")} - {"quickstart", "quickstart_exact"}
    only_on_disk, only_in_recipes = sorted(on_disk - set(RECIPES)), sorted(set(RECIPES) - on_disk)
    assert not only_on_disk and not only_in_recipes, (
        "conf/experiment/ and RECIPES in tests/test_experiment_golden.py disagree: "
        f"only on disk {only_on_disk}, only in RECIPES {only_in_recipes}"
    )


@pytest.mark.parametrize("experiment", sorted(EXTRA_OVERRIDES))
def test_prompt_specific_experiments_require_a_corpus(experiment):
    with pytest.raises(ConfigCompositionException, match="You must specify 'corpus'"):
        compose_train_config([f"experiment={experiment}"], Path(OUTPUT_PLACEHOLDER))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_resolved_config_matches_golden(experiment):
    actual = snapshot_text(experiment, resolved_job_config(experiment))
    golden = GOLDEN / f"{experiment}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
        return
    if not golden.exists():
        pytest.fail(f"no snapshot {golden.relative_to(REPO)}; write it with: {UPDATE_HINT}")
    expected = golden.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"golden/{experiment}.yaml",
                tofile=f"experiment={experiment} (now)",
            )
        )
        pytest.fail(
            f"experiment={experiment} no longer resolves to its snapshot:\n{diff}\n"
            f"If the change is intended, regenerate with: {UPDATE_HINT}",
            pytrace=False,
        )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_settings(experiment):
    cfg = resolved_job_config(experiment)
    config = OmegaConf.to_container(cfg, resolve=True)
    wrong = {}
    for key, expected in RECIPES[experiment].items():
        actual = lookup(config, key)
        if isinstance(expected, dict):
            actual = {k: actual.get(k) for k in expected}
        if actual != expected:
            wrong[key] = f"{actual!r} (release: {expected!r})"
    assert not wrong, f"experiment={experiment} departs from the release: {wrong}"
    assert cfg.system.max_steps == cfg.trainer.max_steps


# Small stand-ins for the full-size generators (same classes), keyed by generator class.
SMALL_GENERATORS: dict[str, dict[str, Any]] = {
    "asd3d.generator.conv3d.ThreeDConvGenerator": dict(
        z_dim=8,
        w_dim=16,
        channels={4: 16, 8: 8},
        output_resolution=8,
        bias_max_resolution=8,
        feature_dim=8,
        decoder_hidden=8,
    ),
    "asd3d.generator.triplane.TriplaneTransformerGenerator": dict(
        width=32, num_layers=1, num_heads=2, token_resolution=4, feature_dim=8, decoder_hidden=8
    ),
    "asd3d.generator.hyper_ingp.HyperINGPGenerator": dict(n_levels=4, log2_hashmap_size=10),
    "asd3d.generator.ingp.INGPGenerator": dict(n_levels=4, log2_hashmap_size=10),
}


def stand_in_config(experiment: str, output_dir: Path) -> DictConfig:
    """The experiment with the procedural prior, procedural prompts (2, or the one a
    prompt-specific recipe needs), a small generator and 12-16² renders; everything else,
    optimizer, regularisers, background, cameras and accumulation included, as the recipe."""
    corpus = (
        ONE_PROMPT
        if experiment in EXTRA_OVERRIDES
        else ["corpus=procedural", "corpus.num_prompts=2", "corpus.num_test_prompts=2"]
    )
    cfg = compose_train_config(
        [f"experiment={experiment}", *corpus, "prior=procedural", "logger=none"],
        output_dir=output_dir,
    )
    milestones = not isinstance(cfg.system.render_resolution, int)
    with open_dict(cfg):
        cfg.prior.pop("perp_neg", None)  # an SD-prior option the recipe sets
        cfg.prior.resolution = 16
        cfg.generator.update(SMALL_GENERATORS[cfg.generator._target_])
        background = cfg.renderer.background
        if "log2_hashmap_size" in background:
            background.update(n_levels=4, log2_hashmap_size=8)
        cfg.renderer.update(num_samples_stratified=8, num_samples_importance=4)
        if "eikonal_points" in cfg.renderer:
            cfg.renderer.eikonal_points = 64
        cfg.system.render_resolution = {0: 12, 0.5: 16} if milestones else 16
        cfg.system.validation.update(resolution=16, num_views=2)
        cfg.system.image_every_n_steps = 0
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_trains_with_stand_in_parts(experiment, tmp_path):
    cfg = stand_in_config(experiment, tmp_path)
    system = build_system(cfg, {})
    accumulate = int(cfg.trainer.accumulate_grad_batches)
    trainer = quiet_cpu_trainer(2, accumulate_grad_batches=accumulate)
    trainer.fit(system)
    assert trainer.global_step == 2


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_full_size_parts_build(experiment):
    """Generator and renderer at full size on the meta device; distiller, cameras, regularisers
    and the optimizer for real (they are small)."""
    cfg = resolved_job_config(experiment)
    with torch.device("meta"):
        generator = instantiate(cfg.generator)
        renderer = instantiate(cfg.renderer)
    count = sum(p.numel() for p in generator.parameters()) + sum(
        p.numel() for p in renderer.parameters()
    )
    expected = PARAMETERS[experiment]
    if expected is not None:
        assert abs(count - expected) / expected < 0.02, (
            f"experiment={experiment}: {count:,} parameters, release {expected:,}"
        )
    instantiate(cfg.distiller)
    instantiate(cfg.cameras)
    instantiate(cfg.system.regularisers)
    optimizer = instantiate(cfg.optimizer)(
        [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    )
    assert isinstance(optimizer, torch.optim.Optimizer)
