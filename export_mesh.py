"""Export a trained generator's mesh for one prompt: GLB, OBJ and PLY with vertex colours.

python export_mesh.py ckpt=outputs/train/runs/<time>/checkpoints/last.ckpt prompt="a red cube"
python export_mesh.py ckpt=... index=3 mesh.resolution=384 mesh.formats=[glb]
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import asd3d  # noqa: F401  (registers the config's ${asd3d.cwd:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="export_mesh")
def main(cfg: DictConfig) -> None:
    from asd3d.evaluation.run import run_mesh_export

    run_mesh_export(cfg)


if __name__ == "__main__":
    main()
