"""pkm_tiny: `tiny` with a product-key memory (Lample et al. 2019) in place of block 2's FFN.

128^2 = 16,384 slots of width 256 (4.2M memory parameters), 4 heads x top-16, per-token
LayerNorm of the queries (the paper's BatchNorm is non-causal).
"""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("pkm_tiny", MemoryConfig(
        variant="pkm", num_rows=128**2, num_heads=4, topk=16, key_dim=64,
        # The paper's code BatchNorms the queries: statistics over batch and time make a token's
        # read depend on later tokens and on run.grad_accum, and decoding impossible. LayerNorm
        # is the per-token norm closest to it: it centres and scales to unit variance as
        # BatchNorm does (RMSNorm only scales), so the scores keep the paper's scale.
        query_norm="layernorm", layers=(2,), mode="replace"))
