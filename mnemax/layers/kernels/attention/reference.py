"""The XLA path of causal GQA attention: `jax.nn.dot_product_attention` over query blocks, each
against only the keys it can see (on TPU, where XLA has no fused attention, and on CPU)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# Query rows per block of the XLA path. Block i of n sees keys [0, (i + 1) * rows) only, so the
# masked upper triangle is mostly never computed: (n + 1) / 2n of the full [time, time] scores
# (5/8 at 4 blocks), in fp32, is what a step materialises and reads (on TPU the attention's
# bytes are most of a dense block's).
QUERY_BLOCK = 512


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None,
                  implementation: Literal["xla", "cudnn"] | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(d) + causal mask) v` per head, q head `n` reading kv head
    `n // (heads / kv_heads)`.

    q `[batch, time, heads, d]`, k, v `[batch, time, kv_heads, d]` -> `[batch, time, heads, d]`.
    `window`: each query sees the `window` latest keys, itself included (None: all earlier ones).
    `implementation`: jax's backend choice (None = XLA today, in jax 0.10 and 0.12 alike); the
    XLA path splits the queries into blocks of `QUERY_BLOCK` rows, each attending the keys
    [first key its earliest query sees, its last query]: the keys it leaves out are masked for
    every query of the block, so each row's softmax is the same as over the whole sequence.
    """
    local = None if window is None else (window - 1, 0)
    seq_len = q.shape[1]
    if implementation == "cudnn" or seq_len <= QUERY_BLOCK:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            implementation=implementation,
                                            local_window_size=local)
    outs = []
    for start in range(0, seq_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, seq_len)
        first = 0 if window is None else max(0, start - window + 1)
        rows = jnp.arange(start, stop)[:, None]
        cols = jnp.arange(first, stop)[None, :]
        visible = cols <= rows
        if window is not None:
            visible &= cols > rows - window
        outs.append(jax.nn.dot_product_attention(
            q[:, start:stop], k[:, first:stop], v[:, first:stop], mask=visible[None, None],
            implementation=implementation))
    return jnp.concatenate(outs, axis=1)
