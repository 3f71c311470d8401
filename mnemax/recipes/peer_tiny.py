"""peer_tiny: PEER (He 2024) on `tiny`: 16,384 single-neuron experts retrieved by product keys
(4 heads x top-16) in place of block 2's FFN."""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory


def recipe():
    return tiny_with_memory("peer_tiny", MemoryConfig(
        variant="peer", num_rows=128**2, num_heads=4, topk=16, key_dim=64,
        # Per-token LayerNorm, not PKM's BatchNorm (non-causal, changes with run.grad_accum,
        # cannot decode): like BatchNorm it centres and scales each query to unit variance,
        # which RMSNorm (scale only) does not. See pkm_tiny.
        query_norm="layernorm", layers=(2,), mode="replace"))
