"""Interactive text-to-3D demo: type any prompt, get the trained generator's 3D result.

python demo.py ckpt=outputs/train/runs/<time>/checkpoints/last.ckpt
python demo.py ckpt=... host=0.0.0.0 port=8080 num_views=60 resolution=256   # docs/demo.md
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import asd3d  # noqa: F401  (registers the config's ${asd3d.cwd:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    from asd3d.demo import run_demo

    run_demo(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
