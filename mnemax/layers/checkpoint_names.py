"""Names of the intermediates layers tag with `jax.ad_checkpoint.checkpoint_name`.

A tag changes nothing by itself; it lets a remat policy chosen by the strategy
(`strategy.remat=save_names:...` / `offload_names:...`, see `mnemax.parallel.remat`) keep that
tensor for the backward pass (or move it to pinned host memory) instead of recomputing it,
as MaxText's `save_*` / `offload_*` remat knobs do. Shapes are per block, in the compute dtype.
"""

from __future__ import annotations

# Attention (mnemax/layers/attention.py).
ATTN_Q = "attn_q"  # query projection, before RoPE: [batch, time, heads, head_dim]
ATTN_K = "attn_k"  # key projection, before RoPE: [batch, time, kv_heads, head_dim]
ATTN_V = "attn_v"  # value projection: [batch, time, kv_heads, head_dim]
ATTN_OUT = "attn_out"  # softmax(q k^T) v, input of the out projection: [b, t, heads, head_dim]

# SwiGLU feed-forward (mnemax/layers/mlp.py).
MLP_GATE = "mlp_gate"  # x W_gate, before the SiLU: [batch, time, mlp]
MLP_UP = "mlp_up"  # x W_up: [batch, time, mlp]
MLP_HIDDEN = "mlp_hidden"  # silu(x W_gate) * x W_up, input of W_down: [batch, time, mlp]

# Gated DeltaNet mixer (mnemax/layers/gated_delta.py).
GDN_QKV = "gdn_qkv"  # q, k, v projections before the short conv: [batch, time, 2 hk + hv]
GDN_OUT = "gdn_out"  # the gated delta rule's output, before the norm: [batch, time, hv_heads, dv]

# Memory layers (mnemax/layers/memory/).
MEMORY_OUT = "memory_out"  # the memory layer's output, added to the FFN's: [batch, time, embed]

# Mixture of experts (mnemax/layers/moe/).
MOE_OUT = "moe_out"  # the experts' weighted sum (+ shared experts): [batch, time, embed]

ALL_NAMES: tuple[str, ...] = (
    ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT,
    MLP_GATE, MLP_UP, MLP_HIDDEN,
    GDN_QKV, GDN_OUT,
    MEMORY_OUT,
    MOE_OUT,
)
