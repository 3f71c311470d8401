"""ultramem_tiny: UltraMem/UltraMemV2 choices on `tiny`: a memory in every block beside a
half-width FFN (mode parallel, ffn_ratio 0.5), Tucker-core retrieval of rank 2 with two cores
(multi-core scoring: each 128-wide value row in two halves, one per core's score; raw scores, no
softmax), implicit value expansion (4,096 physical rows of width 128 read as 16,384 shuffled
virtual rows through 4 projections) and the core penalty with the reference code's margin 0.15
(its weight 0.1 is our choice: UltraMem does not publish one)."""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("ultramem_tiny", MemoryConfig(
        variant="ultramem", num_rows=128**2, num_heads=2, topk=16, key_dim=64, value_dim=128,
        tucker_rank=2, tucker_cores=2, tucker_penalty=0.1, value_expansion=4,
        query_norm="layernorm", layers=(0, 1, 2, 3),
        mode="parallel", ffn_ratio=0.5))
