"""SLURM through Hydra's submitit launcher (docs/slurm.md): composition only, no cluster here."""

import signal

from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment

from asd3d.checkpoint import AtomicCheckpointIO

from cli_helpers import run_entry
from conftest import compose_train

COMMAND = [
    "hydra/launcher=slurm_ddp",
    "trainer=slurm",
    "trainer.devices=4",
    "trainer.num_nodes=2",
    "experiment=cp100k_3dconv_sd",
    "hydra.launcher.partition=gpu",
]


def test_launcher_runs_one_task_per_gpu_on_every_node_and_requeues(tmp_path):
    cfg = compose_train(COMMAND, tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu"
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    strategy = cfg.trainer.strategy._target_
    assert (strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == (
        "pytorch_lightning.strategies.DDPStrategy",
        4,
        2,
    )


def test_trainer_takes_ranks_from_slurm_and_requeues_on_submitits_signal(tmp_path):
    plugins = [instantiate(p) for p in compose_train(COMMAND, tmp_path).trainer.plugins]
    assert isinstance(plugins[0], AtomicCheckpointIO)
    environment = plugins[1]
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR2  # what submitit asks SLURM to send


def test_documented_submission_composes(tmp_path):
    # Hydra takes --cfg instead of -m: the configuration the sweep would submit.
    result = run_entry("train.py", *COMMAND, "--cfg", "hydra", env={"ASD3D_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hydra_submitit_launcher" in result.stdout
    assert "tasks_per_node: ${trainer.devices}" in result.stdout
