"""Renderers: turn a :class:`~asd3d.types.Field` and :class:`~asd3d.types.Cameras` into images."""
