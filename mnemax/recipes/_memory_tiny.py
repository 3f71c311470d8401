"""Shared base of the CPU memory-layer recipes: `tiny` with a memory in some blocks."""

from __future__ import annotations

import dataclasses

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes.tiny import recipe as tiny
from mnemax.trainer.recipe import Recipe


def tiny_with_memory(name: str, memory: MemoryConfig) -> Recipe:
    """`tiny` with `memory`; value tables learn at 10x the dense learning rate (their rows are
    updated only when read: at 1x a fact-recall run stayed at chance, see
    benchmarks/memory_vs_dense.py)."""
    base = tiny()
    return dataclasses.replace(
        base, name=name, model=dataclasses.replace(base.model, memory=memory),
        optimizer=dataclasses.replace(base.optimizer,
                                      sparse_learning_rate=10 * base.optimizer.learning_rate))
