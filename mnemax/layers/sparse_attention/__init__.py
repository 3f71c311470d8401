"""Sparse attention mixers on the block-sparse attention op: MoBA (Lu et al. 2025) and NSA
(Yuan et al. 2025); their settings live in `model.sparse_attention`."""

from mnemax.layers.sparse_attention.config import MoBAConfig, NSAConfig, SparseAttentionConfig
from mnemax.layers.sparse_attention.moba import MoBAAttention, moba_attention
from mnemax.layers.sparse_attention.nsa import NSAAttention

__all__ = ["MoBAAttention", "MoBAConfig", "NSAAttention", "NSAConfig", "SparseAttentionConfig",
           "moba_attention"]
