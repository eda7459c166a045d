"""CLIP metrics: loading through the user's code path, the protocol by hand, DDP = one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_clip import save_tiny_clip

from asd3d.evaluation.clip import ClipMetrics, ClipScorer, clip_view_scores


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _hand_metrics(image_feats: np.ndarray, text_feats: np.ndarray, own: list[int], views: int):
    """REFERENCE.md §7 written out with numpy: per view cosine and argmax, views then prompts."""
    image_feats = image_feats / np.linalg.norm(image_feats, axis=1, keepdims=True)
    text_feats = text_feats / np.linalg.norm(text_feats, axis=1, keepdims=True)
    cosine = image_feats @ text_feats.T
    sims, hits = [], []
    for p, prompt in enumerate(own):
        rows = cosine[p * views : (p + 1) * views]
        sims.append(rows[:, prompt].mean())
        hits.append((rows.argmax(axis=1) == prompt).mean())
    return float(np.mean(sims)), float(np.mean(hits))


def test_scorer_loads_a_local_model_and_metrics_match_a_hand_computation(tiny_clip):
    import open_clip

    config, weights = tiny_clip
    scorer = ClipScorer(str(config), str(weights))
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(scorer.model.state_dict()[k], v) for k, v in saved.items())

    texts = ["a red cube", "a blue sphere", "a green torus on a cube", "a small cat"]
    own, views = [2, 0, 3], 5
    images = torch.rand(len(own) * views, 3, 48, 48, generator=torch.Generator().manual_seed(0))

    # Reference embeddings straight from open_clip, outside asd3d's code.
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.stem, pretrained=str(weights)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(config.stem)
    with torch.no_grad():
        ref_text = model.encode_text(tokenizer(texts)).numpy()
        ref_image = model.encode_image(preprocess(images)).numpy()
    sim, r1 = _hand_metrics(ref_image, ref_text, own, views)

    metric = ClipMetrics(num_prompts=len(texts))
    text_feats = scorer.encode_texts(texts)
    ids = torch.tensor(own).repeat_interleave(views)
    for chunk in torch.arange(len(ids)).split(4):  # a prompt's views arrive over several calls
        metric.update(scorer.encode_images(images[chunk]), ids[chunk], text_feats)
    result = metric.compute()
    assert float(result["clip_sim"]) == pytest.approx(sim, abs=1e-5)
    assert float(result["clip_r1"]) == pytest.approx(r1, abs=1e-7)
    per_prompt = metric.prompt_scores(own[0])
    assert per_prompt["clip_sim"] == pytest.approx(
        _hand_metrics(ref_image[:views], ref_text, own[:1], views)[0], abs=1e-5
    )


def test_ties_count_as_misses_and_single_prompt_hits():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    sim, hit = clip_view_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), feats)
    assert float(sim[0]) == pytest.approx(1.0) and not bool(hit[0])
    sim, hit = clip_view_scores(torch.tensor([[0.0, 2.0]]), torch.tensor([2]), feats)
    assert bool(hit[0])
    _, hit = clip_view_scores(torch.tensor([[0.3, 0.1]]), torch.tensor([0]), feats[:1])
    assert bool(hit[0])


def test_resumed_prompt_means_give_the_same_result():
    gen = torch.Generator().manual_seed(1)
    text, images = torch.randn(6, 8, generator=gen), torch.randn(18, 8, generator=gen)
    ids = torch.arange(6).repeat_interleave(3)
    full = ClipMetrics(6)
    full.update(images, ids, text)
    resumed = ClipMetrics(6)
    resumed.update(images[:9], ids[:9], text)
    for prompt in range(3, 6):  # prompts 3..5 "finished in an earlier run"
        scores = ClipMetrics(6)
        scores.update(images[ids == prompt], ids[ids == prompt], text)
        values = scores.prompt_scores(prompt)
        resumed.add_prompt_means(
            torch.tensor([prompt]),
            torch.tensor([values["clip_sim"]]),
            torch.tensor([values["clip_r1"]]),
            torch.tensor([3]),
        )
    for key, value in full.compute().items():
        assert float(resumed.compute()[key]) == pytest.approx(float(value), abs=1e-7)


def _features(num_prompts: int = 7, views: int = 4):
    gen = torch.Generator().manual_seed(3)
    text = torch.randn(num_prompts, 16, generator=gen)
    # Images near their own prompt's text so that R@1 is neither 0 nor 1.
    images = text.repeat_interleave(views, 0) + 1.2 * torch.randn(
        num_prompts * views, 16, generator=gen
    )
    return text, images, torch.arange(num_prompts).repeat_interleave(views)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        text, images, ids = _features()
        metric = ClipMetrics(num_prompts=len(text))
        for prompt in range(rank, len(text), world):  # strided prompt shards, as evaluate.py
            views = ids == prompt
            metric.update(images[views], ids[views], text)
        result = {k: float(v) for k, v in metric.compute().items()}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_numbers_of_one(tmp_path):
    text, images, ids = _features()
    single = ClipMetrics(num_prompts=len(text))
    single.update(images, ids, text)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert 0.0 < expected["clip_r1"] < 1.0

    out = tmp_path / "ddp.json"
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(2, port, str(out)), nprocs=2, start_method="spawn")
    assert json.loads(out.read_text()) == expected  # exact: sums of per-prompt float64 states


def test_bad_model_names_and_missing_weights_are_one_line_errors(tmp_path, tiny_clip):
    config, _ = tiny_clip
    with pytest.raises(ValueError, match="not an open_clip model"):
        ClipScorer("ViT-Nope-1", None)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        ClipScorer(str(config), str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        ClipScorer(str(config), "laion_nonexistent")


def test_offline_missing_weights_name_the_model_and_the_fix(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import (possibly before conftest set it).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as info:
        ClipScorer("ViT-L-14", "openai")
    message = str(info.value)
    assert "\n" not in message and "ViT-L-14/openai" in message and "clip.pretrained=" in message
