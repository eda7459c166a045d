"""asd3d: text-to-3D generators trained by score distillation from frozen 2D diffusion priors.

Importing the package registers the one OmegaConf resolver its configs use, ``${asd3d.cwd:}``:
the directory a command was started from (``conf/paths/default.yaml``). Hydra's own
``${hydra:runtime.cwd}`` is not set yet while a ``-m`` sweep creates its directory, which is
named from the same paths, so ``python train.py -m ...`` could not start with it.
"""

import os

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("asd3d.cwd", os.getcwd, replace=True)
