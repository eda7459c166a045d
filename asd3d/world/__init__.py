"""The procedural world: a prompt grammar over primitives with analytic SDFs, its scenes and a
deterministic text encoder (DESIGN.md §3)."""

from asd3d.world.grammar import PromptGrammar, parse, prompt_space_size
from asd3d.world.scene import SceneField, SceneObject, SceneSpec
from asd3d.world.text_encoder import ProceduralTextEncoder

__all__ = [
    "ProceduralTextEncoder",
    "PromptGrammar",
    "SceneField",
    "SceneObject",
    "SceneSpec",
    "parse",
    "prompt_space_size",
]
