"""Which memory slots a token reads, and with what weights: product-key search (Lample et al.
2019) and UltraMem's Tucker-decomposed query-key retrieval, TDQKR (Huang et al. 2024).

Scores. With `tucker_rank == 0` the score of slot (i, j) is q1 . K1[i] + q2 . K2[j] and the
search is exact. With rank r > 0 each half has r queries (UltraMemV2 Sec. 3.2: "we use separate
queries for each tucker rank") giving row scores S_row `[r, n]` and column scores S_col `[r, n]`,
and C Tucker cores (UltraMem's multi-core scoring) score slot (i, j) as

    s_c(i, j) = S_row[:, i]^T C_c S_col[:, j]          (UltraMemV2 Eq. 7, one core per c)

The slots are the top-k of sum_c s_c. Candidates come from the rank-1 approximation of the
summed core, sum_c C_c ~ sigma u v^T (its leading singular vectors): the top-k rows of u^T S_row
and the top-k columns of v^T S_col, whose k*k pairs are then scored exactly (the reference
code's `_calc_tucker_1rank` + `TuckerDecomposedQueryKeyRetrieval`). Each slot keeps its C per-core
scores: the layer weights part c of the value row by core c's score.

Slot weights (`MemoryConfig.weighting`): a softmax over a head's k scores (PKM, Memory+, PEER),
or the raw scores (UltraMem: Eq. 5 of UltraMemV2, "the final output is a weighted sum of the
corresponding values", o = sum_i S_grid,i V_i with no normalisation, and UltraMem's reference code
multiplies the values by `best_scores` as they come out of the top-m).
"""

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
    return _layer_norm(q32, None) if kind == "layernorm" else rms_normalize(q32, 1e-6)


def _layer_norm(x: jax.Array, gain: jax.Array | None) -> jax.Array:
    """LayerNorm over the last axis (no bias), times `gain [d]` when given; fp32."""
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, -1, keepdims=True)
    return rms_normalize(x, 1e-6, gain)


def rank_one_factors(cores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Leading singular vectors (u, v) of the summed cores: `cores [C, r, r]` -> `[r], [r]`,
    sum_c C_c ~ sigma u v^T. A search heuristic, so without gradient. SVD fixes (u, v) up to a
    joint sign; we take the sign with sum(u) >= 0 (the reference code keeps the sign closest to
    the previous step's, state a pure function cannot hold; at init the cores are positive, so
    u and v are positive Perron vectors and both choices agree)."""
    total = jax.lax.stop_gradient(jnp.sum(cores.astype(jnp.float32), 0))
    left, _, right_t = jnp.linalg.svd(total)
    u, v = left[:, 0], right_t[0]
    sign = jnp.where(jnp.sum(u) < 0, -1.0, 1.0)
    return u * sign, v * sign


def core_rank_loss(cores: jax.Array, margin: float) -> jax.Array:
    """UltraMem's Tucker-core penalty (UltraMemV2 Eq. 16-17, restating UltraMem):
    mean over heads of 1/(r-1) sum_{i>=2} max(0, lambda_i - tau)^2, lambda the singular values
    of each head's summed core in descending order, tau = `margin` (the reference code's 0.15),
    so the core stays near rank one (its rank-1 search stays accurate) without collapsing to it.
    `cores [H, C, r, r]` -> scalar fp32, differentiable (singular values have a gradient even
    where they coincide)."""
    singular = jnp.linalg.svd(jnp.sum(cores.astype(jnp.float32), 1), compute_uv=False)
    return jnp.mean(jnp.square(jax.nn.relu(singular[:, 1:] - margin)))


def _uniform(bound: float) -> nn.initializers.Initializer:
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)


class ProductKeyRetrieval(nn.Module):
    """Tokens `[B, T, D]` -> (weights `[B, T, H, C, k]` fp32, indices `[B, T, H, k]` int32 in
    `[0, num_rows)`, scores `[B, T, H, k]` fp32 in descending order).

    `C` is `tucker_cores` (1 without TDQKR); `weights[..., c, j]` weights part c of slot j's
    value row. `scores` are the ranking scores (summed over cores).
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
        key_heads = 1 if cfg.variant == "peer" else heads
        subkeys = self.param(
            "subkeys",
            nn.with_logical_partitioning(
                self._subkey_init(half),
                (MEMORY_HEADS if key_heads > 1 else None, None, MEMORY_KEYS, MEMORY_KEY_DIM)),
            (key_heads, 2, n, half),
        )
        subkeys = jnp.broadcast_to(subkeys, (heads, 2, n, half))
        if cfg.tucker_rank:
            # UltraMem: LayerNorm with a learnable gain on queries and keys, each half (and each
            # rank's query) over its `half` features; gains start at half^-0.33 as in the
            # reference code (`nn.init.constant_(self.query_norm.weight, 1/kdim**0.33)`).
            gain_init = nn.with_logical_partitioning(
                nn.initializers.constant(half**-0.33), (axes.NORM,))
            q_gain = self.param("query_gain", gain_init, (half,))
            k_gain = self.param("key_gain", gain_init, (half,))
            q = _layer_norm(q.reshape(*q.shape[:3], 2, rank, half), q_gain)
            subkeys = _layer_norm(subkeys, k_gain)
        else:
            q = _normalize_query(q, cfg.query_norm).reshape(*q.shape[:3], 2, 1, half)
            if cfg.qk_norm:
                q, subkeys = self._qk_norm(q, subkeys, half)
        q, subkeys = q.astype(x.dtype), subkeys.astype(x.dtype)

        if cfg.tucker_rank == 0:
            scores, indices = [], []
            for h in range(heads):
                s, i = product_key_topk(q[:, :, h, :, 0, :], subkeys[h], cfg.topk)
                scores.append(s)
                indices.append(i)
            scores, indices = jnp.stack(scores, 2), jnp.stack(indices, 2)
            per_core = scores[..., None, :]
        else:
            cores = self.param(
                "core",
                # UltraMem's reference code draws every core entry from U(0, 1)
                # (`nn.init.uniform_(c, a=0.0, b=1)`): a positive core has a dominant Perron
                # singular value, so the rank-1 candidate search is well defined at init (an
                # identity core has r equal singular values and no leading direction).
                nn.with_logical_partitioning(nn.initializers.uniform(1.0),
                                             (MEMORY_HEADS, None, MEMORY_RANK, None)),
                (heads, cfg.tucker_cores, rank, rank),
            )
            per_core, indices = jax.vmap(self._tucker_topk, in_axes=(2, 0, 0), out_axes=2)(
                q, subkeys, cores)
            scores = jnp.sum(per_core, axis=-2)
        if cfg.weighting == "softmax":
            weights = jax.nn.softmax(per_core.astype(jnp.float32), axis=-1)
        else:
            weights = per_core.astype(jnp.float32)
        return weights, indices, scores.astype(jnp.float32)

    def _subkey_init(self, half: int) -> nn.initializers.Initializer:
        """PKM / PEER: U(+-1/sqrt(half)) (XLM's `HashingMemory`, `get_uniform_keys(n_keys, half)`
        with `bound = 1 / math.sqrt(dim)`); Memory+: U(+-1/sqrt(key_dim)) (Meta's `memory`
        repository, `reset_parameters`: `bound = 1 / math.sqrt(self.k_dim)`); UltraMem:
        N(0, 1/key_dim) (its reference code, `nn.init.normal_(self.keys, std=1/sqrt(kdim))`,
        whose kdim is our half)."""
        variant = self.config.variant
        if variant == "ultramem":
            return nn.initializers.normal(half**-0.5)
        return _uniform((2 * half if variant == "memory_plus" else half) ** -0.5)

    def _qk_norm(self, q: jax.Array, subkeys: jax.Array, half: int):
        """Memory+'s qk-norm: each query half and sub-key L2-normalised, then times a learnable
        gain per feature (Meta's published code has no qk-norm; UltraMem's reproduction of
        Memory+, `memory_plus_layer.py`, LayerNorms both with an affine gain). Plain unit vectors
        bound each half's score to [-1, 1], so the softmax over the top-k is nearly uniform;
        gains of half^(1/4) give the scores the scale of unit-variance (LayerNormed) vectors,
        q . k ~ sqrt(half) ("gain init 1" on LayerNorm outputs)."""
        gain_init = nn.with_logical_partitioning(nn.initializers.constant(half**0.25),
                                                 (axes.NORM,))
        q_gain = self.param("query_gain", gain_init, (half,))
        k_gain = self.param("key_gain", gain_init, (half,))
        q = l2_normalize(q.astype(jnp.float32)) * q_gain
        subkeys = l2_normalize(subkeys.astype(jnp.float32)) * k_gain
        return q, subkeys

    def _tucker_topk(self, q: jax.Array, subkeys: jax.Array, cores: jax.Array):
        """One head: q `[B, T, 2, r, half]`, subkeys `[2, n, half]`, cores `[C, r, r]` ->
        per-core scores `[B, T, C, k]` (fp32, ranked by their sum) and indices `[B, T, k]`."""
        k, n = self.config.topk, subkeys.shape[1]
        s_row = jnp.einsum("btrd,nd->btrn", q[:, :, 0], subkeys[0],
                           preferred_element_type=jnp.float32)
        s_col = jnp.einsum("btrd,nd->btrn", q[:, :, 1], subkeys[1],
                           preferred_element_type=jnp.float32)
        u, v = rank_one_factors(cores)
        _, rows = jax.lax.top_k(jnp.einsum("btrn,r->btn", s_row, u), k)
        _, cols = jax.lax.top_k(jnp.einsum("btrn,r->btn", s_col, v), k)
        row_scores = jnp.take_along_axis(s_row, rows[:, :, None, :], axis=-1)  # [B, T, r, k]
        col_scores = jnp.take_along_axis(s_col, cols[:, :, None, :], axis=-1)
        candidates = jnp.einsum("xtak,cab,xtbl->xtckl", row_scores,
                                cores.astype(jnp.float32), col_scores)
        flat = candidates.reshape(*candidates.shape[:3], k * k)  # [B, T, C, k*k]
        _, best = jax.lax.top_k(jnp.sum(flat, axis=2), k)
        per_core = jnp.take_along_axis(flat, best[:, :, None, :], axis=-1)
        index = rows[..., None] * n + cols[..., None, :]  # [B, T, k, k]
        return per_core, jnp.take_along_axis(index.reshape(*index.shape[:2], k * k), best, -1)
