"""Generators: prompts (text embeddings) in, one SDF + colour field per prompt out."""

from asd3d.generator.base import Generator
from asd3d.generator.conv3d import ThreeDConvGenerator

__all__ = ["Generator", "ThreeDConvGenerator"]
