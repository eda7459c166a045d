"""Evaluate a trained generator: 120 views per prompt, metrics, turntables, meshes, a gallery.

python evaluate.py ckpt=outputs/train/runs/<time>/checkpoints/last.ckpt
python evaluate.py ckpt=... devices=8                 # 8 GPUs, prompts sharded (docs/evaluation.md)
python evaluate.py ckpt=... clip.pretrained=/path/to/open_clip_pytorch_model.bin
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd3d.cli import restore_ddp_job_argv


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from asd3d.evaluation.run import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    restore_ddp_job_argv()
    main()
