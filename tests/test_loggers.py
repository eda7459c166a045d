"""W&B run identity: names, groups and tags derived from the Hydra config."""

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from asd3d.loggers import hydra_run_identity

from conftest import compose_train


def test_single_run_is_named_by_its_overrides_and_tagged_by_its_choices(tmp_path):
    compose_train(["distiller=sds", "distiller.guidance_scale=20"], tmp_path)
    name, group, tags = hydra_run_identity()
    assert name == "distiller=sds,distiller.guidance_scale=20"
    assert group is None
    assert "distiller:sds" in tags and "generator:3dconv" in tags and "prior:procedural" in tags
    assert not [t for t in tags if t.startswith("experiment:")]  # no experiment chosen


def test_sweep_jobs_share_one_group_named_by_experiment_and_sweep(tmp_path):
    cfg = compose_train(["experiment=quickstart", "distiller.guidance_scale=3"], tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "2026-11-25_08-00-00")
    HydraConfig.instance().set_config(cfg)
    name, group, tags = hydra_run_identity()
    assert group == "quickstart/2026-11-25_08-00-00"
    assert name == "experiment=quickstart,distiller.guidance_scale=3"
    assert "experiment:quickstart" in tags


def test_outside_hydra_there_is_no_identity():
    HydraConfig.instance().cfg = None
    assert hydra_run_identity() == (None, None, [])
