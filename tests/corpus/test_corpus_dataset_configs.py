"""The prompt dataset, its collate function, and every corpus config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from asd3d.corpus.base import Corpus
from asd3d.corpus.dataset import PromptDataset, collate_prompts
from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.types import PromptBatch

REPO = Path(__file__).parents[2]
CORPORA = REPO.parent / "shared" / "corpora"
CONFIGS = sorted((REPO / "conf" / "corpus").glob("*.yaml"))


def test_dataset_and_collate():
    corpus = ProceduralCorpus(10, 4)
    dataset = PromptDataset(corpus, "train")
    assert len(dataset) == 10 and dataset[3] == (3, corpus.prompt("train", 3))
    batches = list(DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate_prompts))
    assert [len(b) for b in batches] == [4, 4, 2]
    first = batches[0]
    assert isinstance(first, PromptBatch) and first.tokens is None and first.pooled is None
    assert first.ids.dtype == torch.long and first.ids.tolist() == [0, 1, 2, 3]
    assert first.texts == tuple(corpus.prompts("train", range(4)))
    assert len(PromptDataset(corpus, "test")) == 4


def test_dataset_rejects_bad_split_and_empty_batch():
    with pytest.raises(ValueError, match="unknown split 'eval'"):
        PromptDataset(ProceduralCorpus(4, 1), "eval")
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompts([])


def test_every_corpus_has_a_config():
    names = {path.stem for path in CONFIGS}
    assert {"procedural", "mg15", "df415", "at2520", "dl17k", "cp100k"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(path):
    node = OmegaConf.load(path)
    assert "_target_" in node and node.get("name") == path.stem
    config = OmegaConf.create({"paths": {"corpora_dir": str(CORPORA)}, "corpus": node})
    target = Path(str(config.corpus.get("path", "")))
    if "path" in node and not target.is_file():
        # Hydra wraps the loader's error; its one line still names the file.
        with pytest.raises(InstantiationException, match=f"FileNotFoundError.*{target.name}"):
            instantiate(config.corpus)
        if path.stem != "cp100k":  # the only corpus not shipped in shared/corpora
            pytest.skip(f"paper corpus {target} is absent")
        return
    corpus = instantiate(config.corpus)
    assert isinstance(corpus, Corpus) and corpus.name == path.stem
    assert corpus.size("train") > 0 and isinstance(corpus.prompt("test", 0), str)
