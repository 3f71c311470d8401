"""Grouped matmul: the expert FFNs of a dropless mixture of experts.

`out[rows of group e] = lhs[rows of group e] @ rhs[e]`, with lhs `[M, K]` rows sorted by group
and `group_sizes [E]` rows per group (rows past `sum(group_sizes)` are padding: zero out, zero
gradient). The XLA path is `jax.lax.ragged_dot`; on TPU it is JAX's Pallas megablox kernel
(`jax.experimental.pallas.ops.tpu.megablox`, MaxText's default), a TPU default from the start
because it ships with JAX. See `op.py`.
"""

from mnemax.layers.kernels.grouped_matmul.op import (
    AUTO_PLATFORMS,
    grouped_matmul,
    megablox_supported,
    reference,
)

__all__ = ["AUTO_PLATFORMS", "grouped_matmul", "megablox_supported", "reference"]
