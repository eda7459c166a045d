"""The procedural world: a prompt grammar over primitives with analytic SDFs, its scenes and a
deterministic text encoder (DESIGN.md §3)."""
