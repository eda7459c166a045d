"""Generators: prompts (text embeddings) in, one SDF + colour field per prompt out."""

from asd3d.generator.base import Generator
from asd3d.generator.conv3d import ThreeDConvGenerator
from asd3d.generator.hashgrid import HashGridEncoding
from asd3d.generator.hyper_ingp import HyperINGPGenerator
from asd3d.generator.ingp import INGPGenerator

__all__ = [
    "Generator",
    "HashGridEncoding",
    "HyperINGPGenerator",
    "INGPGenerator",
    "ThreeDConvGenerator",
]
