"""Train a text-to-3D generator by score distillation.

python train.py                                   # CUDA: the paper's defaults; CPU: the quickstart
python train.py experiment=quickstart             # ASD vs the learned miniature prior, ~15 min on a laptop CPU
python train.py generator=3dconv prior=mvdream corpus=dl17k
python train.py -m distiller.eta=0,0.1,0.2        # a sweep
python train.py ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt   # resume that run
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from asd3d.cli import machine_defaults, restore_ddp_job_argv, user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from asd3d.training import run_training

    return run_training(cfg)


if __name__ == "__main__":
    restore_ddp_job_argv()
    with user_errors():
        from asd3d.checkpoint import resume_argv

        # ckpt_path=...: compose the checkpoint's own run (its recipe), the user's overrides on top.
        sys.argv = [sys.argv[0], *resume_argv(sys.argv[1:])]
    sys.argv[1:] = machine_defaults(sys.argv[1:], cuda=torch.cuda.is_available())
    main()
