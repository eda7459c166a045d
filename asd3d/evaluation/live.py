"""What validation during training shows on a dashboard, beyond the oracle's means.

Every ``trainer.val_check_interval`` steps the system renders the held-out (test-split) prompts on
its validation orbit. :class:`LiveValidation` turns those renders into:

* **CLIP R@1 / Sim** (REFERENCE.md §7 protocol, on the validation orbit instead of 120 views) when
  ``clip_model`` is set -- off by default: it costs a CLIP forward per view and needs weights;
* a **per-prompt table** (prompt, its metrics) logged to loggers that take tables (W&B);
* **turntable videos** of the first ``video_prompts`` test prompts (one frame per orbit view),
  logged to loggers that take videos and written as MP4 under ``<run>/videos``.

The CLIP model is held outside the module tree (not in checkpoints); the metric states are
torchmetrics states reduced over DDP ranks, so the means do not depend on the process count.
Table rows and videos are gathered to rank 0 before logging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor, nn

from asd3d.evaluation.clip import ClipMetrics, ClipScorer
from asd3d.evaluation.media import enlarge, write_turntable

#: Frames of validation videos are upscaled (nearest) to at least this side.
VIDEO_MIN_SIDE = 128


class LiveValidation(nn.Module):
    """Dashboards' view of a validation pass: CLIP metrics, a per-prompt table, videos.

    Args:
        clip_model: open_clip model name / config file (``ViT-L-14``); ``None`` disables CLIP.
        clip_pretrained: pretrained tag or local weights file of ``clip_model``.
        video_prompts: how many test prompts get a turntable video per validation (0: none).
        video_fps: frames per second of those videos (one frame per orbit view).
        table: log a per-prompt results table.
    """

    _scorer: ClipScorer | None  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        clip_model: str | None = None,
        clip_pretrained: str | None = "openai",
        video_prompts: int = 4,
        video_fps: int = 8,
        table: bool = True,
    ) -> None:
        super().__init__()
        if video_prompts < 0:
            raise ValueError(f"video_prompts={video_prompts} must be >= 0 (0 disables videos)")
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.video_prompts = int(video_prompts)
        self.video_fps = int(video_fps)
        self.table = bool(table)
        self.clip_metrics: ClipMetrics | None = None
        object.__setattr__(self, "_scorer", None)  # frozen CLIP: never in the state dict
        self._text_features: Tensor | None = None
        self._rows: list[dict[str, Any]] = []
        self._videos: dict[int, tuple[str, Tensor]] = {}

    @property
    def uses_clip(self) -> bool:
        return self.clip_model is not None

    @property
    def active(self) -> bool:
        """Whether validation has anything to do for this object."""
        return self.uses_clip or self.video_prompts > 0 or self.table

    def start(self, test_prompts: list[str], device: torch.device) -> None:
        """Begin a validation pass over the corpus' ``test_prompts`` (all ranks)."""
        self._rows, self._videos = [], {}
        if self.clip_model is None:
            return
        if self._scorer is None:
            scorer = ClipScorer(self.clip_model, self.clip_pretrained, device=device)
            object.__setattr__(self, "_scorer", scorer)
            self.clip_metrics = ClipMetrics(num_prompts=len(test_prompts)).to(device)
            self._text_features = scorer.encode_texts(test_prompts)
        assert self.clip_metrics is not None
        self.clip_metrics.reset()

    def update(
        self,
        ids: Int[Tensor, "P"],
        texts: tuple[str, ...],
        rgb: Float[Tensor, "B 3 H W"],
        per_prompt: dict[str, Tensor],
    ) -> None:
        """Add ``P`` prompts rendered from ``V = B / P`` orbit views each (prompt-major).

        ``per_prompt``: metrics already computed for these prompts (``P`` values each), e.g. the
        oracle's; they go into the table next to CLIP's.
        """
        views = rgb.shape[0] // len(texts)
        columns = {name: values.detach().float().cpu() for name, values in per_prompt.items()}
        if self.uses_clip:
            assert self.clip_metrics is not None and self._text_features is not None
            assert self._scorer is not None
            features = self._scorer.encode_images(rgb)
            prompt_ids = ids.to(rgb.device).repeat_interleave(views)
            self.clip_metrics.update(features, prompt_ids, self._text_features)
            scores = [self.clip_metrics.prompt_scores(int(i)) for i in ids]
            for name in scores[0] if scores else ():
                columns[name] = torch.tensor([float(s[name]) for s in scores])
        for row, (index, text) in enumerate(zip(ids.tolist(), texts)):
            if self.table:
                self._rows.append(
                    {"index": index, "prompt": text}
                    | {name: float(values[row]) for name, values in columns.items()}
                )
            if index < self.video_prompts:
                frames = rgb[row * views : (row + 1) * views].detach().float().cpu()
                self._videos[index] = (text, frames)

    def compute(self) -> dict[str, Tensor]:
        """CLIP means over all test prompts (DDP-reduced); empty without CLIP."""
        if not self.uses_clip or self.clip_metrics is None:
            return {}
        return self.clip_metrics.compute()

    def log(self, loggers: list[Any], step: int, out_dir: Path, is_global_zero: bool) -> None:
        """Gather rows and videos to rank 0; log them and write the videos as MP4 (all ranks call)."""
        rows, videos = _gather_to_zero(self._rows), _gather_to_zero(list(self._videos.items()))
        if not is_global_zero:
            return
        rows = sorted(rows, key=lambda r: r["index"])
        if rows:
            columns = list(rows[0])
            for logger in loggers:
                if hasattr(logger, "log_table"):
                    data = [[r.get(c) for c in columns] for r in rows]
                    logger.log_table(key="val/prompts", columns=columns, data=data, step=step)
        for index, (text, frames) in sorted(videos):
            side = max(frames.shape[-1], VIDEO_MIN_SIDE)
            path = write_turntable(
                enlarge(frames, side), out_dir / f"val_{index:04d}_{step:06d}.mp4", self.video_fps
            )
            for logger in loggers:
                if hasattr(logger, "log_video"):  # W&B takes the H.264 file as it is
                    logger.log_video(
                        key=f"val/turntable_{index:04d}",
                        videos=[str(path)],
                        step=step,
                        caption=[text],
                    )


def _gather_to_zero(items: list) -> list:
    """All ranks' lists concatenated on every rank (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]
