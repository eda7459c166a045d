"""The procedural prior: the exact (Bayes-optimal) denoiser of the procedural world.

Data model (DESIGN.md §3): for prompt ``y`` seen from camera ``pi`` the clean images are
``x0 ~ N(mu, s^2 I)`` with ``mu = 2 render_gt(y, pi) - 1`` (pixel space in [-1, 1]). With
``x_t = a x0 + sigma eps`` (``a = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``) the posterior
mean of the noise is

    eps_hat(x_t, t | y) = sigma (x_t - a mu) / (a^2 s^2 + sigma^2).

The unconditional branch is the exact denoiser of the equal-weight mixture over ``K`` scenes of
the corpus (the prompt's own scene plus ``K - 1`` others chosen by a hash of the prompt, so there
is no hidden randomness): responsibilities ``r_k ∝ exp(-|x_t - a mu_k|^2 / (2 (a^2 s^2 + sigma^2)))``
and ``eps_hat = sigma (x_t - a sum_k r_k mu_k) / (a^2 s^2 + sigma^2)``. Guidance is then strong
far from the prompt and vanishes once the image is clearly the prompt, as with a real prior.

In a world with ``V > 1`` valid scenes per prompt (``ground_truth.variants``,
``asd3d.world.variation``) the clean images of a prompt are the equal-weight mixture of the
Gaussians around its ``V`` scenes' renders, and the same formulas hold with one component per
scene: the conditional branch mixes the prompt's own ``V`` scenes, the unconditional branch the
``K x V`` scenes of its ``K`` prompts. The denoiser stays exact (Bayes-optimal) for that mixture.
"""

from __future__ import annotations

import random
import zlib

import torch
from jaxtyping import Float, Int
from torch import Tensor

from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.prior.base import Prior, to_pixel_space
from asd3d.prior.schedule import ddpm_alphas_cumprod, gather_abar
from asd3d.types import Cameras, Condition, ConditionPair, PromptBatch, TextEmbedding
from asd3d.world.ground_truth import GroundTruthRenderer
from asd3d.world.text_encoder import ProceduralTextEncoder

_MIXTURE_CACHE_SIZE = 65536  # prompts whose mixture members are remembered


class ProceduralPrior(Prior):
    """Exact denoiser of images near the ground-truth render of a procedural prompt.

    Args:
        corpus: the procedural corpus whose train scenes form the unconditional mixture.
        text_encoder: the world's deterministic text encoder.
        text_dim: embedding width the generators are built for (checked against the encoder).
        resolution: side of the (square) pixel-space images the prior works on.
        data_std: ``s``, the spread of clean images around the ground-truth render.
        mixture_size: ``K``, prompts in the unconditional mixture (own prompt included), each
            with all its valid scenes.
        ground_truth: renders the analytic scenes (the means ``mu``).
        num_train_timesteps, beta_start, beta_end, beta_schedule: the DDPM schedule (SD's).
        seed: picks the mixture's other scenes (with the prompt's hash).
    """

    def __init__(
        self,
        corpus: ProceduralCorpus,
        text_encoder: ProceduralTextEncoder,
        text_dim: int,
        resolution: int,
        data_std: float,
        mixture_size: int,
        ground_truth: GroundTruthRenderer,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(corpus, ProceduralCorpus):
            raise ValueError(
                f"prior=procedural needs corpus=procedural (got {type(corpus).__name__}); "
                "use a real prior (prior=sd21_base) for prompt-library corpora"
            )
        if data_std <= 0:
            raise ValueError(f"prior.data_std={data_std} must be > 0")
        if mixture_size < 1:
            raise ValueError(f"prior.mixture_size={mixture_size} must be >= 1")
        if text_encoder.dim != text_dim:
            raise ValueError(
                f"prior.text_dim={text_dim} differs from the text encoder's dim {text_encoder.dim}"
            )
        self.corpus = corpus
        self.text_encoder = text_encoder
        self.text_dim = text_dim
        self.resolution = resolution
        self.data_std = float(data_std)
        self.mixture_size = min(int(mixture_size), corpus.size("train"))
        self.seed = seed
        self.ground_truth = ground_truth
        self._mixture_cache: dict[str, list[str]] = {}
        self.register_buffer(
            "alphas_cumprod",
            ddpm_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule),
            persistent=False,
        )
        self.freeze()

    # ----------------------------------------------------------------------------- interface
    def encode_text(self, texts: list[str]) -> TextEmbedding:
        return self.text_encoder.encode(list(texts))

    def condition(self, prompts: PromptBatch, cameras: Cameras) -> ConditionPair:
        views = cameras.views_per_prompt
        texts = tuple(text for text in prompts.texts for _ in range(views))
        flags = torch.zeros(len(texts), dtype=torch.bool, device=cameras.c2w.device)
        return ConditionPair(
            positive=Condition(texts, flags, cameras), negative=Condition(texts, ~flags, cameras)
        )

    def encode_images(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B 3 r r"]:
        return to_pixel_space(rgb, self.resolution)

    @torch.no_grad()
    def predict_eps(
        self, x_t: Float[Tensor, "N 3 r r"], t: Int[Tensor, "N"], condition: Condition
    ) -> Float[Tensor, "N 3 r r"]:
        abar = gather_abar(self.alphas_cumprod, t).to(x_t.dtype)
        a, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        variance = a.square() * self.data_std**2 + sigma.square()
        means = self.mixture_means(condition)  # N x (K V) x 3 x r x r
        # Responsibilities of each mixture component (one component on conditional rows).
        sq_dist = (x_t.unsqueeze(1) - a.unsqueeze(1) * means).square().flatten(2).sum(-1)
        logits = -sq_dist / (2.0 * variance.view(-1, 1))
        logits = logits.masked_fill(~self._component_mask(condition, means.shape[1]), float("-inf"))
        resp = torch.softmax(logits, dim=1)
        posterior_mean = torch.einsum("nk,nkchw->nchw", resp, means)
        return sigma * (x_t - a * posterior_mean) / variance

    # ----------------------------------------------------------------------------- internals
    def mixture_prompts(self, text: str) -> list[str]:
        """The prompt itself followed by ``K - 1`` other train prompts, chosen by its hash."""
        cached = self._mixture_cache.get(text)
        if cached is not None:
            return cached
        size = self.corpus.size("train")
        rng = random.Random(zlib.crc32(text.encode()) ^ self.seed)  # same in every process
        others: list[str] = []
        for _ in range(100 * self.mixture_size):  # bounded: a corpus may repeat prompts
            if len(others) == self.mixture_size - 1:
                break
            other = self.corpus.prompt("train", rng.randrange(size))
            if other != text and other not in others:
                others.append(other)
        if len(self._mixture_cache) >= _MIXTURE_CACHE_SIZE:  # bounded whatever the corpus size
            self._mixture_cache.clear()
        self._mixture_cache[text] = [text, *others]
        return self._mixture_cache[text]

    def _component_mask(self, condition: Condition, components: int) -> Tensor:
        """Conditional rows use only their own prompt's scenes (the first ``V`` components)."""
        mask = torch.ones(
            len(condition), components, dtype=torch.bool, device=condition.unconditional.device
        )
        mask[~condition.unconditional, self.ground_truth.num_variants :] = False
        return mask

    def mixture_means(self, condition: Condition) -> Float[Tensor, "N KV 3 r r"]:
        """Ground-truth means ``2 render - 1`` per row and component (prompt-major, then
        scene), each render done once. Conditional rows fill the unused components with their
        own scenes (masked out of the mixture)."""
        variants = self.ground_truth.num_variants
        keys: dict[tuple[str, int, int], int] = {}
        jobs: list[tuple[str, int, int]] = []
        camera_keys = self._camera_ids(condition.cameras)
        slots = torch.empty(len(condition), self.mixture_size * variants, dtype=torch.long)
        for row, (text, uncond) in enumerate(
            zip(condition.texts, condition.unconditional.tolist())
        ):
            prompts = self.mixture_prompts(text) if uncond else [text]
            for j in range(self.mixture_size):
                for variant in range(variants):
                    key = (prompts[min(j, len(prompts) - 1)], variant, camera_keys[row])
                    if key not in keys:
                        keys[key] = len(jobs)
                        jobs.append(key)
                    slots[row, j * variants + variant] = keys[key]
        images = self.render_ground_truth(
            [text for text, _, _ in jobs],
            condition.cameras.index(
                torch.tensor([job[2] for job in jobs]).to(condition.cameras.c2w.device)
            ),
            [job[1] for job in jobs],
        )
        return (images * 2.0 - 1.0)[slots.to(images.device)]

    @staticmethod
    def _camera_ids(cameras: Cameras) -> list[int]:
        """For every row, the first row with an identical camera (so renders are shared)."""
        flat = torch.cat([cameras.c2w.flatten(1), cameras.fovy[:, None]], dim=1)
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)
        first: dict[int, int] = {}
        return [first.setdefault(int(group), row) for row, group in enumerate(inverse.tolist())]

    @torch.no_grad()
    def render_ground_truth(
        self, texts: list[str], cameras: Cameras, variants: list[int] | None = None
    ) -> Float[Tensor, "N 3 r r"]:
        """Ground-truth renders of scene ``variants[i]`` (default 0) of ``texts[i]`` from
        ``cameras[i]``, in ``[0, 1]``."""
        return self.ground_truth(texts, cameras, self.resolution, variants).rgb
