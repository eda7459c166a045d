"""Evaluate a trained generator: 120 views per prompt, metrics, turntables, a contact sheet.

python evaluate.py ckpt=outputs/train/runs/<time>/checkpoints/last.ckpt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from asd3d.evaluation.run import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
