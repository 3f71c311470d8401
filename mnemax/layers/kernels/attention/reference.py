"""The XLA path of causal GQA attention: `jax.nn.dot_product_attention`, which materialises the
`[batch, heads, time, time]` scores (on TPU, where XLA has no fused attention, and on CPU)."""

from __future__ import annotations

from typing import Literal

import jax


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None,
                  implementation: Literal["xla", "cudnn"] | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(d) + causal mask) v` per head, q head `n` reading kv head
    `n // (heads / kv_heads)`.

    q `[batch, time, heads, d]`, k, v `[batch, time, kv_heads, d]` -> `[batch, time, heads, d]`.
    `window`: each query sees the `window` latest keys, itself included (None: all earlier ones).
    `implementation`: jax's backend choice (None = XLA today, in jax 0.10 and 0.12 alike).
    """
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                        local_window_size=local)
