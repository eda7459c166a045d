"""The miniature prior's training images: ground-truth renders of procedural prompts over white.

Rendering the analytic scenes costs ~35 ms a view on one CPU core, ~30x a training step's share
per image, so the images are rendered once into a cache file (keyed by everything that changes
them) and training draws mini-batches from it. Every prompt gets ``views_per_prompt`` random
cameras from the same :class:`~asd3d.cameras.CameraSampler` the distillation uses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from asd3d.cameras import CameraSampler
from asd3d.io import atomic_torch_save
from asd3d.world.ground_truth import GroundTruthRenderer

_FORMAT = 2  # bump when the cache layout or the rendering code changes meaning


@dataclass(frozen=True)
class RenderDataset:
    """``N = P * views_per_prompt`` renders with their prompt index and camera (flattened
    camera-to-world matrix and vertical field of view).

    ``images`` are stored as uint8 (exactly what an 8-bit PNG of the render would hold) to keep
    the cache small; :meth:`batch` returns them scaled to the prior's ``[-1, 1]`` pixel space.
    """

    prompts: tuple[str, ...]
    images: Int[Tensor, "N 3 H W"]
    prompt_ids: Int[Tensor, "N"]
    cameras: Float[Tensor, "N 16"]
    fovy: Float[Tensor, "N"]

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(
        self, index: Int[Tensor, "B"]
    ) -> tuple[
        Float[Tensor, "B 3 H W"], Int[Tensor, "B"], Float[Tensor, "B 16"], Float[Tensor, "B"]
    ]:
        """Images in ``[-1, 1]``, prompt indices, camera codes and fields of view of rows
        ``index``."""
        images = self.images[index].float() / 127.5 - 1.0
        return images, self.prompt_ids[index], self.cameras[index], self.fovy[index]


def cache_key(
    prompts: list[str], views_per_prompt: int, resolution: int, seed: int, settings: dict
) -> str:
    """A short hash of everything the cached renders depend on."""
    payload = json.dumps(
        [_FORMAT, prompts, views_per_prompt, resolution, seed, settings], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def render_views(
    prompts: list[str],
    views_per_prompt: int,
    resolution: int,
    cameras: CameraSampler,
    ground_truth: GroundTruthRenderer,
    seed: int,
    chunk: int = 128,
) -> RenderDataset:
    """Render every prompt from ``views_per_prompt`` random cameras (deterministic in ``seed``)."""
    if views_per_prompt < 1:
        raise ValueError(f"data.views_per_prompt={views_per_prompt} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    sampled = cameras.sample(len(prompts) * views_per_prompt, generator)
    # One view per draw: index() drops the sampler's views-per-prompt grouping.
    sampled = sampled.index(torch.arange(len(sampled)))
    prompt_ids = torch.arange(len(prompts)).repeat_interleave(views_per_prompt)
    # Each view shows one of its prompt's valid scenes, uniformly (all 0 in a one-scene world).
    variants = torch.randint(ground_truth.num_variants, (len(sampled),), generator=generator)
    images = torch.empty(len(sampled), 3, resolution, resolution, dtype=torch.uint8)
    for start in tqdm(range(0, len(sampled), chunk), desc="rendering ground truth", unit="chunk"):
        rows = torch.arange(start, min(start + chunk, len(sampled)))
        texts = [prompts[i] for i in prompt_ids[rows].tolist()]
        rgb = ground_truth(texts, sampled.index(rows), resolution, variants[rows].tolist()).rgb
        images[rows] = (rgb.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return RenderDataset(
        tuple(prompts), images, prompt_ids, sampled.flat_matrix().contiguous(), sampled.fovy
    )


def load_or_render(
    cache_dir: str | Path,
    prompts: list[str],
    views_per_prompt: int,
    resolution: int,
    cameras: CameraSampler,
    ground_truth: GroundTruthRenderer,
    seed: int,
    settings: dict,
) -> RenderDataset:
    """The cached dataset for these settings, rendering (and caching) it on first use.

    ``settings`` must describe the camera distribution and the ground-truth renderer (it is
    hashed into the file name, so changing either renders a new cache).
    """
    key = cache_key(prompts, views_per_prompt, resolution, seed, settings)
    path = Path(cache_dir) / f"renders-{key}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return RenderDataset(
            tuple(stored["prompts"]),
            stored["images"],
            stored["prompt_ids"],
            stored["cameras"],
            stored["fovy"],
        )
    data = render_views(prompts, views_per_prompt, resolution, cameras, ground_truth, seed)
    atomic_torch_save(
        {
            "prompts": list(data.prompts),
            "images": data.images,
            "prompt_ids": data.prompt_ids,
            "cameras": data.cameras,
            "fovy": data.fovy,
            "settings": json.dumps(settings, sort_keys=True),
        },
        path,
    )
    return data
