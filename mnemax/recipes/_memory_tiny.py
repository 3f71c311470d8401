"""Shared base of the CPU memory-layer recipes: `tiny` with a memory in some blocks."""

from __future__ import annotations

import dataclasses

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes.schema import Recipe
from mnemax.recipes.tiny import recipe as tiny


def tiny_with_memory(name: str, memory: MemoryConfig) -> Recipe:
    base = tiny()
    return dataclasses.replace(base, name=name,
                               model=dataclasses.replace(base.model, memory=memory))
