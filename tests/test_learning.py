"""Training on the procedural world actually learns: oracle metrics improve by a clear margin."""

import pytest
import pytorch_lightning as pl

from asd3d.build import build_system

from conftest import bare_trainer, compose_train

FAST = [
    "experiment=quickstart_exact",
    "logger=csv",
    "corpus.num_prompts=4",
    "corpus.num_test_prompts=4",
    "system.render_resolution=32",
    "system.prompts_per_step=4",
    "system.validation.num_views=4",
    "system.image_every_n_steps=0",
    "renderer.num_samples_stratified=32",
    "renderer.num_samples_importance=8",
    "renderer.eikonal_points=256",
]


def train_and_score(tmp_path, steps: int, extra=()):
    cfg = compose_train([*FAST, f"trainer.max_steps={steps}", *extra], tmp_path / "run")
    pl.seed_everything(0, verbose=False)
    system = build_system(cfg, {})
    trainer = bare_trainer(
        steps, limit_val_batches=None, check_val_every_n_epoch=None, val_check_interval=steps
    )
    before = trainer.validate(system, verbose=False)[0]
    trainer.fit(system)
    after = trainer.callback_metrics
    return before, {k: float(v) for k, v in after.items() if k.startswith("val/")}


def test_sds_learns_the_procedural_world(tmp_path):
    # Measured (seed 0): R@1 0 -> 1.0, PSNR 15.2 -> 30.1 dB, IoU 0.35 -> 0.89 (1 thread, 2 min).
    before, after = train_and_score(tmp_path, steps=300)
    assert after["val/psnr"] > before["val/psnr"] + 5.0, (before, after)
    assert after["val/mask_iou"] > before["val/mask_iou"] + 0.2, (before, after)
    assert after["val/oracle_r1"] >= 0.75, (before, after)


@pytest.mark.slow
def test_quickstart_reaches_its_targets(tmp_path):
    """The quickstart's promise (ASD against the committed miniature prior: oracle R@1 >= 0.9,
    PSNR >= 18 dB, issue 6), on its full settings. Measured (make quickstart): 1.00, 22.5 dB."""
    cfg = compose_train(
        ["experiment=quickstart", "logger=csv", "system.image_every_n_steps=0"], tmp_path / "run"
    )
    pl.seed_everything(0, verbose=False)
    system = build_system(cfg, {})
    steps = cfg.trainer.max_steps
    trainer = bare_trainer(
        steps, limit_val_batches=None, check_val_every_n_epoch=None, val_check_interval=steps
    )
    trainer.fit(system)
    assert cfg.distiller._target_.endswith("ASDDistiller")
    assert float(trainer.callback_metrics["val/oracle_r1"]) >= 0.9
    assert float(trainer.callback_metrics["val/psnr"]) >= 18.0
