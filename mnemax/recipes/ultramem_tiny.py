"""ultramem_tiny: UltraMem/UltraMemV2 choices on `tiny`: a memory in every block beside a
half-width FFN (mode parallel, ffn_ratio 0.5), Tucker-core retrieval of rank 2 and implicit value
expansion (4,096 physical rows of width 128 read as 16,384 virtual rows through 4 projections)."""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("ultramem_tiny", MemoryConfig(
        variant="ultramem", num_rows=128**2, num_heads=2, topk=16, key_dim=64, value_dim=128,
        tucker_rank=2, value_expansion=4, query_norm="layernorm", layers=(0, 1, 2, 3),
        mode="parallel", ffn_ratio=0.5))
