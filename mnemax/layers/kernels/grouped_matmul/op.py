"""`grouped_matmul`: checks, the backend choice, and the megablox wrapper.

Backends:
- reference: `jax.lax.ragged_dot` (XLA; CPU and GPU). XLA:GPU lowers it to grouped GEMMs; a
  mnemax Triton kernel would become the GPU default only after a measured benchmark there.
- TPU: megablox `gmm` with its own custom VJP (`gmm` for d_lhs, `tgmm` for d_rhs), tiles
  `(tm, tk, tn)`: tk and tn must divide K and N (so K and N must be multiples of 128, the
  smallest lane tile); M is padded to a multiple of tm here and the padded rows, outside every
  group, are sliced off (as MaxText pads tokens for it). Shapes megablox cannot take run
  `ragged_dot`; the MoE layer says so once (`megablox_supported`).

Like every Pallas call, the megablox kernel cannot be partitioned by XLA: callers run this op
inside `shard_map` (the MoE dispatch does).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from mnemax.errors import ConfigError
from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.tiling import pow2_block

# Shipped with JAX and MaxText's TPU default: `auto` runs it on TPU (DESIGN: such kernels are
# TPU defaults from the start).
AUTO_PLATFORMS: tuple[str, ...] = ("tpu",)
# Largest tiles: MaxText's megablox defaults are 512 x 1024 x 1024 (tokens x in x out); each
# tile is capped by what divides the operand.
MAX_TM, MAX_TK, MAX_TN = 512, 1024, 1024
LANE = 128


def megablox_supported(k: int, n: int) -> bool:
    """Whether megablox takes `[M, k] x [E, k, n]`: both widths whole lane tiles."""
    return k % LANE == 0 and n % LANE == 0


def reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` in lhs dtype, fp32 accumulation."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """`(tm, tk, tn)`: tk, tn the largest powers of two up to the caps dividing k, n; tm the
    cap, or M rounded up to a multiple of 8 sublanes when smaller (one tile, little padding)."""
    tm = min(MAX_TM, -(-m // 8) * 8)
    return tm, pow2_block(k, MAX_TK), pow2_block(n, MAX_TN)


def _megablox(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
              interpret: bool) -> jax.Array:
    m, k = lhs.shape
    tm, tk, tn = tiling(m, k, rhs.shape[2])
    # megablox leaves the rows outside every group unwritten (its own padding and any rows past
    # sum(group_sizes)), forward and in d_lhs: a select on the way in and out gives them zeros
    # and a zero gradient (a select, unlike a product, does not carry their NaNs along).
    grouped = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
    lhs = jnp.where(grouped, lhs, 0)
    pad = -m % tm
    if pad:
        lhs = jnp.pad(lhs, ((0, pad), (0, 0)))
    out = megablox.gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                       lhs.dtype, (tm, tk, tn), None, None, False, interpret)
    return jnp.where(grouped, out[:m], 0)


@functools.cache
def _kernels() -> tuple[Callable, Callable]:
    return (functools.partial(_megablox, interpret=False),
            functools.partial(_megablox, interpret=True))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
    """`[M, K] x [E, K, N]` by groups of rows -> `[M, N]` in lhs dtype (fp32 accumulation).

    lhs rows are sorted by group; `group_sizes [E]` int (sum <= M; rows past the sum get zeros
    and no gradient). Differentiable w.r.t. lhs and rhs. `impl`: see `dispatch.py`; "pallas" /
    "pallas_interpret" run megablox (compiled on TPU, interpreted elsewhere).
    """
    dispatch.check_impl(impl, "tpu")
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ConfigError(f"grouped_matmul: lhs {lhs.shape} must be [M, K] and rhs {rhs.shape} "
                          "[E, K, N] with the same K.")
    if group_sizes.shape != (rhs.shape[0],):
        raise ConfigError(f"grouped_matmul: group_sizes {group_sizes.shape} must be [E] with "
                          f"E = {rhs.shape[0]} groups (rhs {rhs.shape}).")
    supported = megablox_supported(lhs.shape[1], rhs.shape[2])
    if not supported and impl == "auto":
        warnings.warn(f"grouped_matmul: widths {lhs.shape[1]} -> {rhs.shape[2]} are not multiples "
                      f"of {LANE}, which megablox needs; on TPU these experts run "
                      "jax.lax.ragged_dot.", stacklevel=2)
    tpu, tpu_interpret = _kernels() if supported else (None, None)
    fn = dispatch.select(impl, reference=reference, gpu=None, tpu=tpu, gpu_interpret=None,
                         tpu_interpret=tpu_interpret, auto_platforms=AUTO_PLATFORMS,
                         interpret_backend="tpu")
    return fn(lhs, rhs, group_sizes)
