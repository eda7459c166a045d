"""The interactive demo behind ``demo.py``: any prompt -> the trained generator's 3D result.

An amortized generator maps a text embedding to a 3D field in one forward pass, so a prompt it
never saw costs one text-encoder call, one generator call, a turntable render and a marching-cubes
mesh. :class:`DemoGenerator` does that for one prompt (files under ``<run dir>/generations``);
:func:`build_app` puts it behind a Gradio page: a prompt box, the turntable video, the GLB in a
rotatable viewer (downloadable) and the training prompts nearest to the typed one.

"Nearest" is measured in the model's own text space: cosine similarity of the prior's pooled text
embedding (the vector 3DConv-net and Hyper-iNGP read; Triplane-Transformer reads the token states
from the same encoder), so the list shows which training prompts the generator will treat as
similar, not what a human would call similar.

The checkpoint is read with :func:`asd3d.io.load_checkpoint` and rebuilt with
:func:`asd3d.evaluation.run.load_trained_parts`, the same safe path as ``evaluate.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from asd3d.build import Parts, resolve_device
from asd3d.cameras import orbit_cameras
from asd3d.evaluation.media import enlarge, to_uint8, write_turntable
from asd3d.evaluation.mesh import extract_mesh, field_kind_of, write_mesh
from asd3d.evaluation.run import (
    TURNTABLE_MIN_SIZE,
    load_trained_parts,
    prompt_field,
    view_chunks,
)
from asd3d.io import load_checkpoint
from asd3d.prior.base import Prior

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["DemoGenerator", "Generation", "NearestPrompts", "build_app", "check_options"]

#: A progress callback: fraction done in ``[0, 1]`` and what is happening.
Progress = Callable[[float, str], None]

#: The training split whose prompts are searched for neighbours.
TRAIN_SPLIT = "train"


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def _no_progress(fraction: float, description: str) -> None:
    return None


class NearestPrompts:
    """Training prompts ranked by cosine similarity of their pooled text embedding to a query's.

    The embeddings of up to ``max_prompts`` training prompts are computed once (``batch_size``
    texts per encoder call) and kept unit-normalised in float16: ``N x D`` (17k DL17k prompts at
    D = 1024 take 35 MB).
    """

    def __init__(self, prior: Prior, texts: Sequence[str], batch_size: int) -> None:
        self.prior, self.texts = prior, list(texts)
        rows = []
        for start in tqdm(
            range(0, len(self.texts), batch_size),
            desc="embedding training prompts",
            unit="batch",
            disable=len(self.texts) <= batch_size,
        ):
            rows.append(self._embed(self.texts[start : start + batch_size]).half().cpu())
        self.embeddings: Float[Tensor, "N D"] = (
            torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.half)
        )

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> Float[Tensor, "P D"]:
        pooled = self.prior.encode_text(texts).pooled.float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    def __call__(self, text: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest training prompts with their cosine similarity, most similar first."""
        if k < 1 or not self.texts:
            return []
        query = self._embed([text]).cpu()[0]
        similarity = self.embeddings.float() @ query
        top = similarity.topk(min(k, len(self.texts)))
        return [(self.texts[i], float(s)) for s, i in zip(top.values, top.indices.tolist())]


@dataclass(frozen=True)
class Generation:
    """What one prompt produced: files a browser can show, and its nearest training prompts."""

    prompt: str
    turntable: Path  # .mp4, H.264 (plays in browsers)
    mesh: Path  # .glb with vertex colours, +y up
    neighbours: list[tuple[str, float]]  # (training prompt, cosine similarity)
    seconds: float


def check_options(cfg: DictConfig) -> None:
    """Reject bad demo options with one line naming the key, the value and what is allowed."""
    for name, low in (("num_views", 1), ("resolution", 8), ("fps", 1)):
        if int(cfg[name]) < low:
            raise ValueError(f"{name}={cfg[name]} must be >= {low}")
    if int(cfg.mesh_resolution) < 2:
        raise ValueError(f"mesh_resolution={cfg.mesh_resolution} must be >= 2")
    if not 0 <= int(cfg.nearest.k) <= 50:
        raise ValueError(f"nearest.k={cfg.nearest.k} must be between 0 and 50")
    if not 0 <= int(cfg.port) <= 65535:
        raise ValueError(f"port={cfg.port} must be between 0 and 65535 (0: any free port)")


class DemoGenerator:
    """A trained checkpoint ready to turn any prompt into a turntable video and a GLB mesh."""

    def __init__(
        self,
        cfg: DictConfig,
        parts: Parts,
        device: torch.device,
        seed: int,
        orbit: tuple[float, float],
        out_dir: Path,
    ) -> None:
        """``orbit``: camera distance and vertical field of view (degrees) of the turntable."""
        self.cfg, self.parts, self.device, self.seed, self.out_dir = (
            cfg,
            parts,
            device,
            seed,
            out_dir,
        )
        self.cameras = orbit_cameras(
            num_views=int(cfg.num_views),
            elevation_deg=float(cfg.elevation_deg),
            distance=orbit[0],
            fovy_deg=orbit[1],
            device=device,
        )
        colour = parts.oracle.background_rgb if parts.oracle is not None else (1.0, 1.0, 1.0)
        self.background = torch.tensor(colour, device=self.device)
        self.field_kind = field_kind_of(parts.renderer)
        size = parts.corpus.size(TRAIN_SPLIT)
        count = min(size, int(cfg.nearest.max_prompts))
        self.nearest = NearestPrompts(
            parts.prior,
            parts.corpus.prompts(TRAIN_SPLIT, range(count)) if cfg.nearest.k else [],
            int(cfg.nearest.batch_size),
        )
        self._count = 0

    @classmethod
    def from_checkpoint(cls, cfg: DictConfig, out_dir: Path) -> DemoGenerator:
        """Load ``cfg.ckpt`` (safely: no code from the file runs) on ``cfg.device``."""
        checkpoint = load_checkpoint(Path(cfg.ckpt))
        device = resolve_device(str(cfg.device))
        run_cfg, parts = load_trained_parts(checkpoint, device)
        seed = int(run_cfg.seed) if cfg.seed is None else int(cfg.seed)
        run_orbit = run_cfg.system.validation
        orbit = (
            float(cfg.distance if cfg.distance is not None else run_orbit.distance),
            float(cfg.fovy_deg if cfg.fovy_deg is not None else run_orbit.fovy_deg),
        )
        return cls(cfg, parts, device, seed, orbit, out_dir)

    @torch.no_grad()
    def generate(self, prompt: str, progress: Progress = _no_progress) -> Generation:
        """The generator's result for ``prompt``; raises ``ValueError`` for an empty prompt."""
        text = " ".join(str(prompt).split())
        if not text:
            raise ValueError("prompt is empty: type a description of an object, e.g. 'a red cube'")
        limit = int(self.cfg.max_prompt_chars)
        if len(text) > limit:
            raise ValueError(f"prompt has {len(text)} characters; at most {limit} are allowed")
        start = time.perf_counter()
        progress(0.0, "encoding the prompt")
        field = prompt_field(self.parts, text, 0, self.seed, self.device)
        frames = []
        done = 0
        for cams in view_chunks(self.cameras, int(self.cfg.view_chunk)):
            progress(
                0.05 + 0.6 * done / len(self.cameras), f"rendering views {done}/{len(self.cameras)}"
            )
            resolution = int(self.cfg.resolution)
            render = self.parts.renderer(
                field,
                cams,
                resolution,
                resolution,
                background_rgb=self.background.expand(len(cams), 3),
            )
            frames.append(to_uint8(enlarge(render.rgb, TURNTABLE_MIN_SIZE)))
            done += len(cams)
        self._count += 1
        stem = self.out_dir / f"{self._count:04d}_{_slug(text)}"
        progress(0.65, "writing the turntable video")
        video = write_turntable(np.concatenate(frames), stem.with_suffix(".mp4"), int(self.cfg.fps))
        progress(0.7, "extracting the mesh (marching cubes)")
        mesh = extract_mesh(
            field,
            float(self.parts.renderer.radius),
            resolution=int(self.cfg.mesh_resolution),
            field_kind=self.field_kind,
            device=self.device,
            chunk_points=int(self.cfg.chunk_points),
        )
        glb = write_mesh(mesh, stem, ["glb"])["glb"]
        progress(0.95, "finding the nearest training prompts")
        neighbours = self.nearest(text, int(self.cfg.nearest.k))
        return Generation(text, video, glb, neighbours, time.perf_counter() - start)


def _theme() -> gr.themes.Base:
    import gradio as gr

    # System fonts only: the default theme fetches Google fonts, which an offline machine cannot.
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def build_app(demo: DemoGenerator, title: str) -> gr.Blocks:
    """The Gradio page: prompt in; turntable, GLB viewer and nearest training prompts out."""
    import gradio as gr

    def on_generate(prompt: str, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        try:
            result = demo.generate(
                prompt, lambda fraction, description: progress(fraction, desc=description)
            )
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        rows = [[text, round(similarity, 3)] for text, similarity in result.neighbours]
        status = f"{result.prompt!r}: generated in {result.seconds:.1f} s"
        return str(result.turntable), str(result.mesh), rows, status

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nType any prompt; the trained generator answers in one pass.")
        with gr.Row():
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="a small red cube on top of a blue cylinder",
                elem_id="prompt",
                scale=4,
            )
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            video = gr.Video(
                label="Turntable", autoplay=True, loop=True, elem_id="turntable", format=None
            )
            model = gr.Model3D(label="Mesh (GLB: drag to rotate)", elem_id="mesh")
        neighbours = gr.Dataframe(
            headers=["nearest training prompt", "cosine similarity"],
            label="Nearest training prompts (the model's text embedding)",
            elem_id="neighbours",
            interactive=False,
        )
        outputs = [video, model, neighbours, status]
        button.click(on_generate, inputs=prompt, outputs=outputs)
        prompt.submit(on_generate, inputs=prompt, outputs=outputs)
    return app


def run_demo(cfg: DictConfig, out_dir: Path) -> None:
    """The body of ``demo.py``: load the checkpoint, serve the page until interrupted."""
    from asd3d.cli import user_errors

    with user_errors(out_dir):
        check_options(cfg)
        demo = DemoGenerator.from_checkpoint(cfg, out_dir / "generations")
    app = build_app(demo, str(cfg.title))
    app.queue(default_concurrency_limit=1)  # one generation at a time: it uses the whole device
    print(f"asd3d demo of {cfg.ckpt}: open http://{cfg.host}:{cfg.port or '<port>'} (Ctrl+C stops)")
    app.launch(
        server_name=str(cfg.host),
        server_port=int(cfg.port) or None,
        share=False,
        theme=_theme(),
        allowed_paths=[str(out_dir)],
        footer_links=[],
        quiet=False,
    )
