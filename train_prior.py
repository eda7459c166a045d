"""Train the miniature learned prior on procedural renders (docs/miniature-prior.md).

python train_prior.py                                  # the committed weights/miniature recipe
python train_prior.py export_dir=weights/miniature     # write the diffusers directory there
python train_prior.py ckpt_path=<run>/checkpoints/last.ckpt   # resume an interrupted run
python train_prior.py evaluate_only=weights/miniature  # only measure an exported prior (into the run dir)
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import asd3d  # noqa: F401  (registers the config's ${asd3d.cwd:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="train_prior")
def main(cfg: DictConfig) -> float:
    from asd3d.cli import user_errors
    from asd3d.miniature.evaluation import evaluate_pretrained
    from asd3d.miniature.training import run_prior_training

    with user_errors():
        if cfg.evaluate_only:
            # Into this run's directory: the weights keep the record of their own training.
            result = evaluate_pretrained(Path(cfg.evaluate_only), cfg, cfg.paths.output_dir)
        else:
            result = run_prior_training(cfg)
    print(f"sample accuracy {result['sample_accuracy']:.4f} ({result['num_samples']} samples)")
    return float(result["sample_accuracy"])


if __name__ == "__main__":
    main()
