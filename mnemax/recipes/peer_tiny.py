"""peer_tiny: PEER (He 2024) on `tiny`: 16,384 single-neuron experts retrieved by product keys
(4 heads x top-16) in place of block 2's FFN."""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("peer_tiny", MemoryConfig(
        variant="peer", num_rows=128**2, num_heads=4, topk=16, key_dim=64,
        query_norm="batchnorm", layers=(2,), mode="replace"))
