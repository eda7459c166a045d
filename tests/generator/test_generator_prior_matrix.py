"""Every generator trains from the command line on every kind of prior (issue 4's matrix).

Tiny random SD and MVDream weights are saved in the formats users download and loaded back
through ``prior.pretrained`` / ``prior.checkpoint``; generators are shrunk to their conformance
sizes. Each run is two optimizer steps of ``train.py``; the procedural prior's runs are each
generator's own CLI test (tests/generator/).
"""

import sys
from pathlib import Path

import pytest

from asd3d.io import load_checkpoint

from cli_helpers import train
from generator_testing import NERF, SMALL_OVERRIDES

sys.path.insert(0, str(Path(__file__).parents[1] / "prior"))
from tiny_mvdream import TINY_UNET_OVERRIDES, save_tiny_mvdream  # noqa: E402
from tiny_sd import RESOLUTION, TEXT_DIM, save_tiny_sd  # noqa: E402


def generator_overrides(name: str) -> list[str]:
    """``generator=<name>`` at its conformance size, reading the prior's text width."""
    if name == "3dconv":
        return ["generator=3dconv_small"]  # 3dconv's own small variant (text_dim from the prior)
    small = {k: v for k, v in SMALL_OVERRIDES[name].items() if k != "text_dim"}
    overrides = [f"generator={name}", *(f"generator.{k}={v}" for k, v in small.items())]
    if "text_dim" in SMALL_OVERRIDES[name]:
        overrides.append("generator.text_dim=${prior.text_dim}")
    return overrides + (NERF if name == "ingp" else [])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_priors")
    return {"sd": save_tiny_sd(root / "sd"), "mvdream": save_tiny_mvdream(root / "mvdream")}


def prior_overrides(kind: str, weights: dict) -> list[str]:
    common = [f"prior.text_dim={TEXT_DIM}", f"prior.resolution={RESOLUTION}"]
    if kind == "sd":
        return ["prior=sd21_base", f"prior.pretrained={weights['sd']}", *common]
    tiny = weights["mvdream"]
    return [
        "prior=mvdream",
        f"prior.pretrained={tiny['pretrained']}",
        f"prior.checkpoint={tiny['checkpoint']}",
        *common,
        *TINY_UNET_OVERRIDES,
    ]


@pytest.mark.parametrize("prior", ["sd", "mvdream"])
@pytest.mark.parametrize("generator", ["3dconv", "hyper_ingp", "triplane", "ingp"])
def test_generator_trains_on_prior(generator, prior, weights, tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        *generator_overrides(generator),
        *prior_overrides(prior, weights),
        "distiller=asd",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        "callbacks.checkpoint.every_n_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("prior") or "unet" in k]
