"""pkm_tiny: `tiny` with a product-key memory (Lample et al. 2019) in place of block 2's FFN.

128^2 = 16,384 slots of width 256 (4.2M memory parameters), 4 heads x top-16, BatchNorm-style
query normalisation as in the paper.
"""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("pkm_tiny", MemoryConfig(
        variant="pkm", num_rows=128**2, num_heads=4, topk=16, key_dim=64,
        query_norm="batchnorm", layers=(2,), mode="replace"))
