"""Train the miniature learned prior on procedural renders (docs/miniature-prior.md).

python train_prior.py                                  # the committed weights/miniature recipe
python train_prior.py export_dir=weights/miniature     # write the diffusers directory there
python train_prior.py ckpt_path=<run>/checkpoints/last.ckpt   # resume an interrupted run
python train_prior.py evaluate_only=weights/miniature  # only measure an exported prior (into the run dir)

The grammar-wide prior (docs/miniature-prior.md), resumed from its committed resume file:
python train_prior.py --config-name train_prior_grammar
python train_prior.py --config-name train_prior_grammar evaluate_only=weights/miniature_grammar/resume.pt
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
    from asd3d.miniature.training import export_resume_file, run_prior_training

    with user_errors():
        if cfg.evaluate_only:
            weights = Path(cfg.evaluate_only)
            if weights.is_file():  # a resume file: measure the run's current EMA weights
                weights = export_resume_file(weights, cfg, Path(cfg.paths.output_dir) / "miniature")
            # Into this run's directory: the weights keep the record of their own training.
            result = evaluate_pretrained(weights, cfg, cfg.paths.output_dir)
        else:
            result = run_prior_training(cfg)
    if "stopped_at_step" in result:
        return float("nan")
    print(f"sample accuracy {result['sample_accuracy']:.4f} ({result['num_samples']} samples)")
    return float(result["sample_accuracy"])


if __name__ == "__main__":
    main()
