"""Which memory slots a token reads: product-key search (Lample et al. 2019) and UltraMem's
Tucker-decomposed variant (Huang et al. 2024)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers import axes
from mnemax.layers.kernels.product_keys import product_key_topk
from mnemax.layers.memory.config import MemoryConfig
from mnemax.layers.primitives import l2_normalize, rms_normalize

MEMORY_HEADS = "memory_heads"
MEMORY_KEYS = "memory_keys"
MEMORY_KEY_DIM = "memory_key_dim"
MEMORY_RANK = "memory_rank"


def _normalize_query(q: jax.Array, kind: str) -> jax.Array:
    """Normalises the queries `q: [B, T, H, features]` (any dtype; computed in fp32).

    `layernorm` / `rmsnorm`: each token's query, per head, over its features (causal).
    `batchnorm`: each head's feature over all B x T tokens of the batch (PKM's BatchNorm, without
    running averages). Non-causal: a token's query depends on later tokens and on the other
    sequences of the (micro-)batch, so `run.grad_accum` changes the model. Unusable for decoding:
    one new token of one sequence has zero variance (q = 0), and a batch of them depends on the
    other sequences; `MemoryConfig.check_decodable` refuses it.
    """
    if kind == "none":
        return q
    q32 = q.astype(jnp.float32)
    if kind == "batchnorm":
        # No running averages: the same normalisation at train and eval time.
        reduce = tuple(range(q.ndim - 2))
        mean = jnp.mean(q32, reduce, keepdims=True)
        var = jnp.var(q32, reduce, keepdims=True)
        return ((q32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(q.dtype)
    if kind == "layernorm":
        q32 = q32 - jnp.mean(q32, -1, keepdims=True)
    return rms_normalize(q32, 1e-6).astype(q.dtype)


def _leading_singular_vectors(core: jax.Array, iters: int = 8) -> tuple[jax.Array, jax.Array]:
    """(u, v) with core ~ s u v^T, by power iteration, without gradient (a search heuristic)."""
    core = jax.lax.stop_gradient(core.astype(jnp.float32))
    v = jnp.ones(core.shape[-1], jnp.float32) / core.shape[-1] ** 0.5
    for _ in range(iters):
        u = l2_normalize(core @ v)
        v = l2_normalize(core.T @ u)
    return u, v


class ProductKeyRetrieval(nn.Module):
    """Tokens `[B, T, D]` -> slot weights `[B, T, H, k]` (fp32, softmax per head) and slot
    indices `[B, T, H, k]` (int32, in `[0, num_rows)`).

    With `tucker_rank == 0` the score of slot (i, j) is q1 . K1[i] + q2 . K2[j] and the search is
    exact. With rank r > 0 (UltraMem's TDQKR) each half has r query vectors and the score is
    sum_ab S_row[a, i] C[a, b] S_col[b, j] with a learned core C; candidates come from the
    rank-1 approximation of C, then are re-scored exactly.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        heads, half, n = cfg.num_heads, cfg.key_dim // 2, cfg.subkeys
        rank = max(cfg.tucker_rank, 1)
        d_model = x.shape[-1]
        w_query = self.param(
            "query",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.linear_std(d_model, d_model)),
                                         (axes.EMBED, MEMORY_HEADS, MEMORY_KEY_DIM)),
            (d_model, heads, rank * cfg.key_dim),
        )
        q = jnp.einsum("btd,dhk->bthk", x, w_query.astype(x.dtype))
        q = _normalize_query(q, cfg.query_norm)
        q = q.reshape(*q.shape[:3], 2, rank, half)  # [B, T, H, half_index, r, half]
        subkeys = self.param(
            "subkeys",
            nn.with_logical_partitioning(nn.initializers.normal(half**-0.5),
                                         (MEMORY_HEADS, None, MEMORY_KEYS, MEMORY_KEY_DIM)),
            (heads, 2, n, half),
        ).astype(x.dtype)
        if cfg.qk_norm:
            q, subkeys = l2_normalize(q), l2_normalize(subkeys)

        if cfg.tucker_rank == 0:
            scores, indices = [], []
            for h in range(heads):
                s, i = product_key_topk(q[:, :, h, :, 0, :], subkeys[h], cfg.topk)
                scores.append(s)
                indices.append(i)
            scores, indices = jnp.stack(scores, 2), jnp.stack(indices, 2)
        else:
            core = self.param(
                "core",
                nn.with_logical_partitioning(
                    lambda key, shape: jnp.eye(shape[-1])[None].repeat(shape[0], 0)
                    + 0.01 * jax.random.normal(key, shape),
                    (MEMORY_HEADS, MEMORY_RANK, None)),
                (heads, rank, rank),
            )
            scores, indices = jax.vmap(self._tucker_topk, in_axes=(2, 0, 0), out_axes=2)(
                q, subkeys, core)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        return weights, indices, scores

    def _tucker_topk(self, q: jax.Array, subkeys: jax.Array, core: jax.Array):
        """One head: q `[B, T, 2, r, half]`, subkeys `[2, n, half]`, core `[r, r]`."""
        k, n = self.config.topk, subkeys.shape[1]
        s_row = jnp.einsum("btrd,nd->btrn", q[:, :, 0], subkeys[0],
                           preferred_element_type=jnp.float32)
        s_col = jnp.einsum("btrd,nd->btrn", q[:, :, 1], subkeys[1],
                           preferred_element_type=jnp.float32)
        u, v = _leading_singular_vectors(core)
        _, rows = jax.lax.top_k(jnp.einsum("btrn,r->btn", s_row, u), k)
        _, cols = jax.lax.top_k(jnp.einsum("btrn,r->btn", s_col, v), k)
        row_scores = jnp.take_along_axis(s_row, rows[:, :, None, :], axis=-1)  # [B, T, r, k]
        col_scores = jnp.take_along_axis(s_col, cols[:, :, None, :], axis=-1)
        candidates = jnp.einsum("xtak,ac,xtcl->xtkl", row_scores, core.astype(jnp.float32),
                                col_scores)
        scores, flat = jax.lax.top_k(candidates.reshape(*candidates.shape[:2], k * k), k)
        index = rows[..., None] * n + cols[..., None, :]  # [B, T, k, k]
        return scores, jnp.take_along_axis(index.reshape(*index.shape[:2], k * k), flat, -1)
