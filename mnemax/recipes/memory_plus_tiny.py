"""memory_plus_tiny: Memory+ (Berges et al. 2024) on `tiny`: one value table shared by blocks 1
and 3, which it serves in place of their FFNs, with qk-norm and the SiLU-gated output."""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("memory_plus_tiny", MemoryConfig(
        variant="memory_plus", num_rows=128**2, num_heads=4, topk=16, key_dim=64,
        qk_norm=True, gated=True, shared=True, query_norm="none", layers=(1, 3),
        mode="replace"))
