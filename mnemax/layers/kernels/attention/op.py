"""The public attention op: backend choice by platform at lowering time.

`impl`:
- "auto": splash attention on TPU (it ships with JAX and is MaxText's TPU default), the XLA path
  of `jax.nn.dot_product_attention` elsewhere (jax 0.10 and 0.12 pick XLA for
  `implementation=None`, on GPU too).
- "splash": the splash kernel on TPU and in Pallas interpret mode elsewhere (slow; for checking).
- "xla": the XLA path everywhere.
- "cudnn": cuDNN's fused attention (GPU only; bf16/fp16).

Chosen with `jax.lax.platform_dependent` when the function is lowered, so a program traced on a
CPU host and compiled for a TPU topology carries the kernel. Shapes splash cannot take (a
sequence that is not a multiple of 128, heads that do not split over the devices) get the XLA
path with a one-line notice.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, get_args

import jax
from jax.sharding import PartitionSpec

from mnemax.layers.kernels.attention import splash
from mnemax.layers.kernels.attention.reference import xla_attention

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
ATTENTION_IMPLS = get_args(AttentionImpl)


def _may_lower_for_tpu() -> bool:
    """Whether this trace may be lowered for TPU: the mesh in context is of TPU chips, or there is
    none and the default backend is TPU. Decides only whether "auto" tells that splash was not
    used (a CPU run of a 64-token model has nothing to be told)."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return platform == "tpu"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None,
                     impl: AttentionImpl = "auto", spec: PartitionSpec | None = None,
                     residual_name: str | None = None, block: int | None = None) -> jax.Array:
    """Causal grouped-query attention, `softmax(q k^T / sqrt(d)) v` with q head `n` reading kv
    head `n // (heads / kv_heads)` (Ainslie et al., "GQA", 2023).

    q `[batch, time, heads, d]`, k, v `[batch, time, kv_heads, d]` -> `[batch, time, heads, d]`.
    `window`: each query sees its `window` latest keys, itself included (None: all earlier).
    `spec`: how `[batch, time, heads, d]` is split over the mesh in context, for the kernel's
    `shard_map` (None: no mesh; the time entry is ignored, attention needs the whole sequence).
    `residual_name`: remat name of the kernel's saved output and log-sum-exp. `block`: splash's
    block size (default: the largest of 512, 256, 128 dividing the sequence).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {ATTENTION_IMPLS}.")
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or (
            k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]):
        raise ValueError(f"q {q.shape} must be [batch, time, heads, d] and k, v {k.shape}, "
                         f"{v.shape} [batch, time, kv_heads, d] with heads a multiple of kv_heads.")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: a sliding window holds at least the query itself "
                         "(window >= 1), or None for full causal attention.")
    xla = functools.partial(xla_attention, window=window)
    if impl in ("xla", "cudnn"):
        return xla(q, k, v, implementation=impl)
    if spec is not None:
        # A batch too small to split (model.init traces one sequence) is computed whole on every
        # device, as GSPMD does with the rest of the model.
        batch_axes = spec[0] if q.shape[0] % splash.shard_count(spec[0]) == 0 else None
        spec = PartitionSpec(batch_axes, None, *spec[2:])
    block = splash.block_size(q.shape[1]) if block is None else block
    reason = splash.unsupported_reason(q.shape, k.shape, block, spec)
    if reason is not None:
        if impl == "splash" or _may_lower_for_tpu():
            warnings.warn(f"splash attention unavailable ({reason}); using the XLA path.",
                          stacklevel=2)
        return xla(q, k, v)
    kernel = functools.partial(splash.splash_attention, window=window, block=block, spec=spec,
                               residual_name=residual_name)
    default = xla if impl == "auto" else functools.partial(kernel, interpret=True)
    return jax.lax.platform_dependent(q, k, v, tpu=functools.partial(kernel, interpret=False),
                                      default=default)
