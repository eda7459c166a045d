"""CLIP R@1 and CLIP similarity with open_clip (REFERENCE.md §7).

The paper's protocol: every test prompt is rendered from 120 views; each view is resized to the
CLIP input size (224² for ViT-L/14) and encoded, and every test prompt of the corpus is encoded.
With unit-norm features ``f(image)`` and ``g(prompt)``:

* **Sim** = ``cos(f(view), g(own prompt))``, averaged over the views of a prompt, then over prompts.
* **R@1** = whether the own prompt is the nearest (highest cosine) of *all* test prompts,
  averaged over the views of a prompt, then over prompts.

Tie rule (as the oracle's, :func:`asd3d.evaluation.oracle.retrieves_own`): a view whose cosine to
another prompt *equals* its cosine to its own counts as a miss, so the result does not depend on
prompt order.

Pieces:

* :class:`ClipScorer` loads any open_clip model (a built-in name, a JSON config file, or
  ``local-dir:``/``hf-hub:``) with a pretrained tag or a local weights file, offline-aware, and
  encodes texts and ``[0, 1]`` image tensors (through the model's own open_clip evaluation
  transform: bicubic resize of the shortest side, centre crop, the model's mean/std).
* :func:`clip_view_scores` -- the per-view cosine to the own prompt and the R@1 hit.
* :class:`ClipMetrics` -- a torchmetrics ``Metric`` with per-prompt sums reduced by ``"sum"``, so
  sharding prompts over DDP ranks gives exactly the numbers of one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ClipMetrics", "ClipScorer", "clip_view_scores"]

#: Suffixes of weight files open_clip reads (``pretrained=<file>``).
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(_WEIGHT_SUFFIXES) or value.startswith((".", "~"))


class ClipScorer:
    """An open_clip model in eval mode that encodes prompts and rendered images.

    Args:
        model: an open_clip model name (``ViT-L-14``), a path to a model-config JSON file (it is
            registered with ``open_clip.add_model_config``; the model is named after the file's
            stem), or open_clip's ``local-dir:<folder>`` / ``hf-hub:<repo>`` schemas.
        pretrained: a pretrained tag of that model (``openai``), a local weights file
            (``.bin/.pt/.pth/.safetensors``), or ``None`` for random weights (tests only).
            Ignored with the ``local-dir:``/``hf-hub:`` schemas (they carry their weights).
        device: where the model runs.
        text_batch_size: prompts encoded per forward pass in :meth:`encode_texts`.

    Tags whose weights were trained with QuickGELU (OpenAI's) get it switched on, so
    ``ViT-L-14`` + ``openai`` is the same network as OpenAI's ViT-L/14 (the release's evaluator).
    Weight files are read with ``weights_only=True``. Offline (``HF_HUB_OFFLINE=1``) a tag whose
    weights are not in the Hugging Face cache raises one ``FileNotFoundError`` line saying how to
    provide them.
    """

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: torch.device | str = "cpu",
        text_batch_size: int = 256,
    ) -> None:
        import open_clip  # heavy (timm, torchvision): imported only when CLIP is used

        self.device = torch.device(device)
        self.text_batch_size = int(text_batch_size)
        name, pretrained = self._resolve(open_clip, str(model), pretrained)
        tag_cfg = {}
        if pretrained and not os.path.isfile(pretrained) and ":" not in name:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ValueError(
                    f"clip.pretrained={pretrained!r} is neither a pretrained tag of {name} "
                    f"(known: {', '.join(tags) or 'none'}) nor an existing weights file"
                )
        try:
            # open_clip logs through the root logger (INFO lines, and an ERROR before it raises
            # the offline error handled below): keep the evaluation's output readable.
            logging.disable(logging.ERROR)
            network, _, transform = open_clip.create_model_and_transforms(
                name,
                pretrained=pretrained,
                device=self.device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                weights_only=True,
            )
            self.tokenizer = open_clip.get_tokenizer(name)
        except RuntimeError as err:
            if "download" in str(err).lower() or "hub" in str(err).lower():
                raise FileNotFoundError(
                    f"CLIP weights {name}/{pretrained} are not in the Hugging Face cache and "
                    "could not be downloaded: run once with network access to fill the cache, "
                    "or set "
                    "clip.pretrained=/path/to/open_clip_pytorch_model.bin (clip.model=null "
                    "disables CLIP metrics)"
                ) from None
            raise
        finally:
            logging.disable(logging.NOTSET)
        self.model = network.eval().requires_grad_(False)
        self.name, self.pretrained = name, pretrained
        self.transform = transform

    @staticmethod
    def _resolve(open_clip, model: str, pretrained: str | None) -> tuple[str, str | None]:
        if model.endswith(".json"):
            config = Path(model).expanduser()
            if not config.is_file():
                raise FileNotFoundError(f"clip.model={model}: model-config file not found")
            open_clip.add_model_config(config)
            model = config.stem
        elif ":" not in model:
            model = model.replace("/", "-")  # OpenAI's spelling ViT-L/14 is open_clip's ViT-L-14
        if ":" not in model and model not in open_clip.list_models():
            raise ValueError(
                f"clip.model={model!r} is not an open_clip model; use a name from "
                "open_clip.list_models() (e.g. ViT-L-14), a model-config .json file, or "
                "local-dir:<folder>"
            )
        if pretrained is not None:
            pretrained = str(pretrained)
            if _looks_like_path(pretrained):
                path = Path(pretrained).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"clip.pretrained={pretrained}: weights file not found")
                pretrained = str(path)
        return model, pretrained

    def describe(self) -> str:
        return f"{self.name}/{self.pretrained}"

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Float[Tensor, "Q D"]:
        """Unit-norm text features of ``texts`` (float32, on :attr:`device`), in batches."""
        out = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.text_batch_size]))
            out.append(self.model.encode_text(tokens.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def preprocess(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 S S"]:
        """``[0, 1]`` images to the model's input with the model's own evaluation transform.

        open_clip's transform (torchvision) takes batched tensors as well as PIL images: resize
        of the shortest side to the model's input size (bicubic, antialiased), centre crop, the
        model's mean/std (OpenAI's for ViT-L-14/openai: 224², REFERENCE.md §7).
        """
        return self.transform(images.to(self.device, torch.float32).clamp(0.0, 1.0))

    @torch.no_grad()
    def encode_images(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B D"]:
        """Unit-norm image features of ``[0, 1]`` images (float32, on :attr:`device`)."""
        features = self.model.encode_image(self.preprocess(images)).float()
        return torch.nn.functional.normalize(features, dim=-1)


def clip_view_scores(
    image_features: Float[Tensor, "B D"],
    prompt_ids: Int[Tensor, " B"],
    text_features: Float[Tensor, "Q D"],
) -> tuple[Float[Tensor, " B"], Bool[Tensor, " B"]]:
    """Per view: cosine to its own prompt, and whether the own prompt is the strict nearest.

    Features are normalised here (the cosine needs unit vectors); ``prompt_ids`` index rows of
    ``text_features`` (all test prompts of the corpus). REFERENCE.md §7.
    """
    if image_features.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"{image_features.shape[0]} image features for {prompt_ids.shape[0]} prompt ids"
        )
    images = torch.nn.functional.normalize(image_features.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_features.float().to(images.device), dim=-1)
    ids = prompt_ids.to(images.device).long()
    cosine = images @ texts.T  # B x Q
    own = cosine.gather(1, ids[:, None])[:, 0]
    others = cosine.scatter(1, ids[:, None], float("-inf"))
    best_other = others.max(dim=1).values if cosine.shape[1] > 1 else torch.full_like(own, -2.0)
    return own, own > best_other


class ClipMetrics(Metric):
    """CLIP Sim and R@1 over ``num_prompts`` test prompts, exact across DDP shards.

    ``update(image_features, prompt_ids, text_features)`` takes any views of any prompts (a
    prompt's views may arrive over several calls); the state holds, per prompt, the sum of
    cosines, the number of R@1 hits and the number of views (float64, reduced with ``"sum"``).
    A prompt is scored on one rank, so the sum over ranks adds zeros to every other rank's
    entries and :meth:`compute` gives bit-identical results for any sharding.

    ``compute`` returns ``clip_sim`` and ``clip_r1``: per prompt the mean over its views, then
    the mean over the prompts that received views (NaN when none did).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    sim_sum: Tensor
    hit_sum: Tensor
    view_count: Tensor

    def __init__(self, num_prompts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_prompts < 1:
            raise ValueError(f"ClipMetrics: num_prompts={num_prompts} must be >= 1")
        self.num_prompts = int(num_prompts)
        for name in ("sim_sum", "hit_sum", "view_count"):
            self.add_state(
                name,
                default=torch.zeros(self.num_prompts, dtype=torch.float64),
                dist_reduce_fx="sum",
            )

    def update(
        self,
        image_features: Float[Tensor, "B D"],
        prompt_ids: Int[Tensor, " B"],
        text_features: Float[Tensor, "Q D"],
    ) -> None:
        """Add ``B`` views; ``prompt_ids[b]`` is the row of view ``b``'s prompt in
        ``text_features`` (all ``Q = num_prompts`` test prompts)."""
        if text_features.shape[0] != self.num_prompts:
            raise ValueError(
                f"ClipMetrics: {text_features.shape[0]} text features for {self.num_prompts} prompts"
            )
        sim, hit = clip_view_scores(image_features, prompt_ids, text_features)
        self._add(prompt_ids, sim, hit.double(), torch.ones_like(sim, dtype=torch.float64))

    def add_prompt_means(
        self,
        prompt_ids: Int[Tensor, " P"],
        sim: Float[Tensor, " P"],
        r_at_1: Float[Tensor, " P"],
        num_views: Int[Tensor, " P"],
    ) -> None:
        """Add prompts scored earlier, from their per-prompt means and view counts (a resumed
        evaluation restores finished prompts this way)."""
        views = torch.as_tensor(num_views, dtype=torch.float64)
        self._add(
            torch.as_tensor(prompt_ids),
            torch.as_tensor(sim, dtype=torch.float64) * views,
            torch.as_tensor(r_at_1, dtype=torch.float64) * views,
            views,
        )

    def _add(self, ids: Tensor, sim: Tensor, hits: Tensor, views: Tensor) -> None:
        device = self.sim_sum.device
        ids = ids.to(device).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_prompts):
            raise IndexError(f"ClipMetrics: prompt ids outside [0, {self.num_prompts})")
        self.sim_sum.index_add_(0, ids, sim.to(device, torch.float64))
        self.hit_sum.index_add_(0, ids, hits.to(device, torch.float64))
        self.view_count.index_add_(0, ids, views.to(device, torch.float64))

    def prompt_scores(self, prompt_id: int) -> dict[str, float]:
        """This process's ``clip_sim`` and ``clip_r1`` of one prompt (means over its views)."""
        views = float(self.view_count[prompt_id])
        if views == 0:
            raise ValueError(f"ClipMetrics: prompt {prompt_id} has no views yet")
        return {
            "clip_sim": float(self.sim_sum[prompt_id]) / views,
            "clip_r1": float(self.hit_sum[prompt_id]) / views,
        }

    def compute(self) -> dict[str, Tensor]:
        seen = self.view_count > 0
        views = self.view_count[seen]
        return {
            "clip_sim": (self.sim_sum[seen] / views).mean().float(),
            "clip_r1": (self.hit_sum[seen] / views).mean().float(),
        }
