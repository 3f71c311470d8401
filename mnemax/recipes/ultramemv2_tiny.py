"""ultramemv2_tiny: UltraMemV2 (Huang et al. 2025) on `tiny`.

A memory in every block beside a half-width FFN (mode parallel, ffn_ratio 0.5); Tucker-core
retrieval of rank 2 with one head reading the top 32 of 16,384 slots; PEER-style values without
the expert activation (the block input through a 256 -> 64 pre-value projection, dotted with 64-wide
pre-values, weighting 64-wide values, their sum taken back to 256 by one linear layer: the paper's
Eq. 15 and its single-linear value expansion); the raw top-k scores weight the experts (its
Eq. 5 and 13, no softmax); UltraMemV2's initialisation (its App. A) for those weights, with the
memory's linear layers at the model's own init std, as the paper does. Each block has its own
table: the paper's models do (Table 10 notes that only Memory+ shares values across layers;
sharing is an ablation, Sec. 4.2.8).
"""

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes._memory_tiny import tiny_with_memory
from mnemax.recipes.tiny import recipe as tiny
from mnemax.trainer.recipe import Recipe


def recipe() -> Recipe:
    return tiny_with_memory("ultramemv2_tiny", MemoryConfig(
        variant="peer", num_rows=128**2, num_heads=1, topk=32, key_dim=64, tucker_rank=2,
        pre_value_dim=64, value_dim=64, peer_activation="none", query_norm="layernorm",
        slot_weights="scores",
        init="ultramemv2", init_linear_std=tiny().model.init_std, layers=(0, 1, 2, 3),
        mode="parallel", ffn_ratio=0.5))
