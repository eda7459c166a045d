"""Prompt-library corpora: the paper's JSON files and clear errors for bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asd3d.corpus.prompt_library import PromptLibraryCorpus

CORPORA = Path(__file__).parents[2].parent / "shared" / "corpora"

# (file, train, val, test) from shared/corpora/SOURCES.md.
PAPER_CORPORA = [
    ("magic3d_15_prompt_library.json", 15, 15, 15),
    ("dreamfusion_415_prompt_library.json", 415, 16, 415),
    ("att3d_2520_prompt_library.json", 2520, 56, 2520),
    ("instant3d_17000_prompt_library.json", 17_241, 100, 100),
]


@pytest.mark.parametrize("file, train, val, test", PAPER_CORPORA, ids=lambda v: str(v)[:12])
def test_paper_corpora_sizes(file, train, val, test):
    path = CORPORA / file
    if not path.is_file():
        pytest.skip(f"paper corpus {path} is absent (shared/corpora is not checked out)")
    corpus = PromptLibraryCorpus(path)
    assert (corpus.size("train"), corpus.size("val"), corpus.size("test")) == (train, val, test)
    raw = json.loads(path.read_text(encoding="utf-8"))
    for split in ("train", "val", "test"):
        n = len(raw[split])
        assert corpus.prompts(split, [0, n // 2, n - 1]) == [
            raw[split][i] for i in (0, n // 2, n - 1)
        ]
    assert corpus.name == file.removesuffix("_prompt_library.json")


def test_dl17k_keeps_duplicates_and_overlap():
    path = CORPORA / "instant3d_17000_prompt_library.json"
    if not path.is_file():
        pytest.skip(f"paper corpus {path} is absent")
    corpus = PromptLibraryCorpus(path, name="dl17k")
    train = corpus.prompts("train", range(corpus.size("train")))
    assert len(set(train)) == 13_551 and corpus.name == "dl17k"
    assert len(set(corpus.prompts("test", range(100))) & set(train)) == 35


def write(tmp_path: Path, content: str, name: str = "lib.json") -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_large_library_and_unicode(tmp_path):
    train = [f"caption {i} – a chair with ünïcode" for i in range(110_000)]
    path = write(
        tmp_path,
        json.dumps({"train": train, "val": train[:3], "test": []}),
        "cap3d_100k_prompt_library.json",
    )
    corpus = PromptLibraryCorpus(path)
    assert corpus.name == "cap3d_100k" and corpus.size("train") == 110_000
    assert corpus.prompt("train", 109_999) == train[-1] and corpus.size("test") == 0


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "cap3d_100k_prompt_library.json"
    with pytest.raises(FileNotFoundError) as info:
        PromptLibraryCorpus(path)
    message = str(info.value)
    assert str(path) in message and "ASD3D_CORPORA_DIR" in message and "\n" not in message


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"train": ["a"], "val": []}', "lacks the split(s) ['test']"),
        ('{"train": "a cat", "val": [], "test": []}', "'train' must be a list"),
        ('{"train": ["a", 3], "val": [], "test": []}', "train[1] is int"),
        ('{"train": [], "val": ["a"], "test": ["a"]}', "empty 'train'"),
    ],
)
def test_malformed_files(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as info:
        PromptLibraryCorpus(path)
    message = str(info.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_bad_split_and_index(tmp_path):
    corpus = PromptLibraryCorpus(write(tmp_path, '{"train": ["a", "b"], "val": [], "test": []}'))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        corpus.size("validation")
    with pytest.raises(IndexError, match=r"prompt index 2 outside \[0, 2\)"):
        corpus.prompt("train", 2)
    with pytest.raises(IndexError, match="-1"):
        corpus.prompt("train", -1)
