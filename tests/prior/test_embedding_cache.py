"""Text embeddings on disk: build (1 and 2 processes), read back, the SD prior's use of the file,
one-line errors on bad files, and flat resident memory from 1k to 100k prompts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from asd3d.prior.embedding_cache import (
    KEYS,
    TOKENS,
    TextEmbeddingFile,
    build_embedding_file,
    text_key,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_sd import RESOLUTION, TEXT_DIM, save_tiny_sd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def fake_encode(texts, num_tokens=5, dim=3):
    """Deterministic per-text values (the text's key spread over the row)."""
    base = torch.tensor([text_key(t) % 1000 for t in texts], dtype=torch.float32) / 100
    tokens = base.view(-1, 1, 1) + torch.arange(num_tokens * dim).view(1, num_tokens, dim) / 64
    return tokens, tokens[:, -1]


TEXTS = [f"prompt number {i}" for i in range(23)] + ["", "a ünïcode prompt\nwith a newline"]


def test_build_and_read_back(tmp_path):
    out = build_embedding_file(
        tmp_path / "emb", TEXTS + TEXTS[:3], fake_encode, "m", 4, progress=False
    )
    reader = TextEmbeddingFile(out, model="m", text_dim=3)
    assert len(reader) == len(TEXTS)  # duplicates stored once
    assert not (tmp_path / "emb.partial").exists()
    found = reader.lookup(TEXTS + ["not there"])
    assert set(found) == set(TEXTS)
    tokens, pooled = fake_encode(TEXTS)
    for i, text in enumerate(TEXTS):
        assert found[text][0].dtype == torch.float16
        torch.testing.assert_close(found[text][0], tokens[i].half())
        torch.testing.assert_close(found[text][1], pooled[i].half())
    assert reader.rows(["not there"]) == [None]
    clone = pickle.loads(pickle.dumps(reader))  # ddp_spawn pickles the prior
    torch.testing.assert_close(clone.lookup(TEXTS[:1])[TEXTS[0]][0], found[TEXTS[0]][0])
    lines = (out / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line) for line in lines) == sorted(TEXTS)


def _build_rank(rank, out, init_file):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    build_embedding_file(
        out, TEXTS, fake_encode, "m", 2, rank, 2, torch.distributed.barrier, progress=False
    )
    torch.distributed.destroy_process_group()


def test_two_processes_fill_one_file(tmp_path):
    """Two gloo processes, each encoding every other batch into the shared file, give the same
    file as one process."""
    mp.spawn(_build_rank, args=(tmp_path / "two", tmp_path / "init"), nprocs=2, join=True)
    one = build_embedding_file(tmp_path / "one", TEXTS, fake_encode, "m", 2, progress=False)
    for name in ("tokens.npy", "pooled.npy", "keys.npy", "prompts.jsonl", "index.json"):
        assert (tmp_path / "two" / name).read_bytes() == (one / name).read_bytes(), name


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "index.json").unlink(), "no index.json"),
        (lambda d: (d / "index.json").write_text("{oops"), "not an asd3d text-embedding index"),
        (lambda d: (d / TOKENS).write_bytes((d / TOKENS).read_bytes()[:-10]), "truncated"),
        (lambda d: np.save(d / TOKENS, np.zeros((2, 5, 3), np.float16)), r"index says float16"),
        (lambda d: np.save(d / KEYS, np.zeros(3, np.int32)), "expected uint64"),
    ],
)
def test_bad_file_is_one_line(tmp_path, damage, message):
    out = build_embedding_file(tmp_path / "emb", TEXTS, fake_encode, "m", 8, progress=False)
    damage(out)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        TextEmbeddingFile(out, model="m", text_dim=3)
    assert "\n" not in str(error.value) and "asd3d.embed_prompts" in str(error.value)


def test_model_and_width_must_match(tmp_path):
    out = build_embedding_file(tmp_path / "emb", TEXTS, fake_encode, "model-a", 8, progress=False)
    with pytest.raises(ValueError, match="built for model 'model-a', the prior loads 'model-b'"):
        TextEmbeddingFile(out, model="model-b", text_dim=3)
    with pytest.raises(ValueError, match="width 3, the prior's text_dim is 1024"):
        TextEmbeddingFile(out, model="model-a", text_dim=1024)


# ----------------------------------------------------------------------------- SD prior
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield save_tiny_sd(tmp_path_factory.mktemp("tiny_sd_embeddings"))
    torch.set_num_threads(threads)


def sd_prior(path, **kwargs):
    from asd3d.prior.stable_diffusion import StableDiffusionPrior

    options = {"text_dim": TEXT_DIM, "resolution": RESOLUTION, "dtype": "fp32", **kwargs}
    return StableDiffusionPrior(pretrained=str(path), **options)


def test_sd_prior_reads_the_file_and_encodes_the_rest(tiny_dir, tmp_path, caplog):
    on_demand = sd_prior(tiny_dir, text_cache_size=0)
    prompts = ["a red cube", "a blue cone, side view", ""]

    def encode(texts):
        embedding = on_demand.encode_text(texts)
        return embedding.tokens, embedding.pooled

    out = build_embedding_file(tmp_path / "emb", prompts, encode, str(tiny_dir), 2, progress=False)
    prior = sd_prior(tiny_dir, text_embeddings=str(out))
    calls = []
    original = prior._encode_uncached
    prior._encode_uncached = lambda texts: calls.append(list(texts)) or original(texts)
    with caplog.at_level(logging.WARNING):
        got = prior.encode_text(prompts + ["a green torus"])
    assert calls == [["a green torus"]]  # only the text missing from the file hit the encoder
    assert "1 text(s) not in" in caplog.text
    expected = on_demand.encode_text(prompts + ["a green torus"])
    torch.testing.assert_close(got.tokens, expected.tokens)
    torch.testing.assert_close(got.pooled, expected.pooled)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        sd_prior(tiny_dir, text_embeddings=str(tmp_path / "nowhere"))


def test_embedding_texts_cover_the_view_prompts(tiny_dir):
    texts = sd_prior(tiny_dir).embedding_texts("a cube")
    assert texts == ["a cube"] + [
        f"a cube, {v} view" for v in ("front", "side", "back", "overhead")
    ]
    assert sd_prior(tiny_dir, view_dependent_prompting=False).embedding_texts("a cube") == [
        "a cube"
    ]


# ----------------------------------------------------------------------------- memory
RSS_SCRIPT = r"""
import json, random, sys, torch
sys.path.insert(0, {tests!r})
from tiny_sd import RESOLUTION, TEXT_DIM
from asd3d.prior.stable_diffusion import StableDiffusionPrior
from asd3d.types import PromptBatch
from asd3d.cameras import CameraSampler
torch.set_num_threads(1)
prior = StableDiffusionPrior({tiny!r}, text_dim=TEXT_DIM, resolution=RESOLUTION, dtype="fp32",
                             text_embeddings={emb!r}, text_cache_size=64,
                             view_dependent_prompting=False)
rng = random.Random(0)
sampler = CameraSampler([1.0, 1.5], [40, 70], [-10, 45], [-180, 180])
for step in range(40):  # prompts drawn across the whole file, as an amortized run does
    texts = tuple(f"prompt {{rng.randrange({n})}}" for _ in range(4))
    prior.encode_text(list(texts))
    prior.condition(PromptBatch(ids=torch.arange(4), texts=texts), sampler.sample(4))
# VmHWM: this process' own peak (ru_maxrss would carry the forking parent's peak across exec).
peak_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({{"peak_kb": peak_kb, "missing": prior.embedding_file.num_missing}}))
"""


def peak_rss_mb(tiny_dir: Path, emb: Path, n: int) -> tuple[float, int]:
    code = RSS_SCRIPT.format(
        tests=str(REPO / "tests" / "prior"), tiny=str(tiny_dir), emb=str(emb), n=n
    )
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["peak_kb"] / 1024, out["missing"]


def constant_encode(texts):
    """Texts' rows are all equal: building 100k rows costs only the disk writes."""
    tokens = torch.full((len(texts), 77, TEXT_DIM), 0.5)
    return tokens, tokens[:, 0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.slow
def test_resident_memory_flat_from_1k_to_100k_prompts(tiny_dir, tmp_path):
    """The SD text path over a 100k-prompt file stays within
    200 MB of the same run over 1k prompts: rows are read from disk, never mapped or kept."""
    peaks = {}
    for n in (1_000, 100_000):
        # Every text the prior asks for without view prompts: the prompts and the empty prompt
        # (view variants would make the file 5x larger on disk, not in memory).
        texts = [f"prompt {i}" for i in range(n)] + [""]
        emb = build_embedding_file(
            tmp_path / f"emb{n}", texts, constant_encode, str(tiny_dir), 4096, progress=False
        )
        peaks[n], missing = peak_rss_mb(tiny_dir, emb, n)
        assert missing == 0
    assert peaks[100_000] - peaks[1_000] < 200, peaks
