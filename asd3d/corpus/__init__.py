"""Prompt corpora: the paper's prompt libraries and the procedural corpus."""

from asd3d.corpus.base import SPLITS, Corpus
from asd3d.corpus.dataset import PromptDataset, collate_prompts
from asd3d.corpus.procedural import ProceduralCorpus
from asd3d.corpus.prompt_library import PromptLibraryCorpus

__all__ = [
    "SPLITS",
    "Corpus",
    "ProceduralCorpus",
    "PromptDataset",
    "PromptLibraryCorpus",
    "collate_prompts",
]
