"""The public product-key top-k: input checks and the backend choice."""

from __future__ import annotations

import jax

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.product_keys.reference import reference


def _check_inputs(query: jax.Array, subkeys: jax.Array, k: int) -> None:
    """Raises ValueError naming the input whose shape (or `k`) the op cannot take."""
    if query.ndim < 2 or query.shape[-2] != 2:
        raise ValueError(f"query must be [..., 2, d_half], got shape {query.shape}.")
    if subkeys.ndim != 3 or subkeys.shape[0] != 2 or subkeys.shape[2] != query.shape[-1]:
        raise ValueError(f"subkeys must be [2, n, d_half={query.shape[-1]}], got shape "
                         f"{subkeys.shape}.")
    n = subkeys.shape[1]
    if not 1 <= k <= n * n:
        raise ValueError(f"k={k} must be in [1, n*n={n * n}].")


def product_key_topk(query: jax.Array, subkeys: jax.Array, k: int, *,
                     impl: dispatch.Impl = "auto") -> tuple[jax.Array, jax.Array]:
    """Exact top-k product keys: `query [..., 2, d_half]`, `subkeys [2, n, d_half]` ->
    `(scores [..., k] fp32, descending; indices [..., k] int32 = i1 * n + i2)`, equal bitwise
    to the brute-force top-k over all n*n keys, ties included (see `reference`).

    `impl`: see `dispatch.py`. There is no kernel: every impl but `pallas_interpret` (which
    raises) runs the plain-jnp search.
    """
    _check_inputs(query, subkeys, k)
    fn = dispatch.select(impl, reference=reference, gpu=None, tpu=None, gpu_interpret=None,
                         tpu_interpret=None, auto_platforms=())
    return fn(query, subkeys, k)
