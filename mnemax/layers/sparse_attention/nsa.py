"""NSA: Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention", Sec. 3.2-3.3).

Three branches, each with its own keys and values (Sec. 3.3.3: independent keys and values
per branch, so one branch's learning does not shortcut another's), mixed per head by gates
(Eq. 5): `o_t = sum_c g_t^c Attn(q_t, K~_t^c, V~_t^c)`, `g = sigmoid(x W_g + b_g)` per head and
branch (a linear gate, as fla's NSA layer; the paper says "an MLP and sigmoid").

- cmp (Eq. 7-8): blocks of l keys at stride d, `[i d, i d + l)`, each mapped to one token by a
  learnable MLP `phi` with an intra-block position embedding (added to each of the l keys, then
  the block flattened, `l * head_dim -> hidden -> head_dim`, GELU; one MLP for keys, one for
  values, shared by the kv heads). Query t attends the compressed tokens whose blocks end at or
  before it (`i d + l - 1 <= t`); dense over T / d tokens, in jnp. This branch uses q and keys
  without RoPE: its tokens carry position through the intra-block embedding only (a compressed
  token mixes l rotated keys, which no single rotation could describe).
- slc (Eq. 9-12): selection blocks of l' keys scored from the cmp branch's probabilities
  (Eq. 8) by Eq. 9: `p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[j l'/d + m - n]` (0-based:
  for each stride of block j, the compressed blocks covering it), summed over the heads of a
  GQA group (Eq. 10) so the group shares its blocks; each token reads the top-n blocks (Eq. 11),
  n counting the initial block and the 2 local blocks (its own and the one before) that are
  always read (Sec. 4.1). Through the block-sparse op (block size l', one list per group of
  `query_block` tokens: the paper's kernel reads each query's own choices, Sec. 3.4, and a
  small group's union stays close to them; the group's q heads share the lists, so the GPU
  kernel loads each block once for all of them, as the paper's), causal; the selection is
  under `stop_gradient` (top-n is not differentiable, and the paper trains the selection only
  through the cmp branch's own output).
- win (Sec. 3.3.3): the w latest keys, through the op with a contiguous list of blocks and
  `window=w`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes, checkpoint_names
from mnemax.layers.attention import KV_AXES, Q_AXES, GroupedQueryAttention, kernel_spec
from mnemax.layers.kernels.block_sparse_attention import block_sparse_attention
from mnemax.layers.kernels.block_sparse_attention.blocks import masked_softmax
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.dispatch import Impl
from mnemax.layers.rope import apply_rope
from mnemax.layers.sparse_attention.config import NSAConfig
from mnemax.layers.sparse_attention.moba import block_lists

BRANCHES = ("cmp", "slc", "win")
DROPPED = "nsa/dropped_choices"  # aux metric: fraction of selected blocks a capped list left out


def compress_blocks(x: jax.Array, config: NSAConfig) -> jax.Array:
    """`[batch, T, kv_heads, d]` -> `[batch, nc, l, kv_heads, d]`: keys (or values)
    `[i d, i d + l)` of each compressed block i < nc (Eq. 7)."""
    starts = np.arange(config.compressed_tokens(x.shape[1])) * config.compress_stride
    return x[:, starts[:, None] + np.arange(config.compress_block)]


def compressed_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         config: NSAConfig) -> tuple[jax.Array, jax.Array]:
    """The cmp branch (Eq. 8): q `[batch, T, heads, d]`, compressed k, v `[batch, nc, kv_heads,
    d]` -> (output `[batch, T, heads, d]`, probabilities p_cmp `[batch, heads, T, nc]`, fp32;
    all zero for a query no compressed block has ended before)."""
    seq_len, heads, d = q.shape[1:]
    group = heads // k.shape[2]
    kh = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    vh = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    scores = jnp.einsum("bthd,bnhd->bhtn", q.astype(jnp.float32), kh) * d ** -0.5
    ends = np.arange(k.shape[1]) * config.compress_stride + config.compress_block - 1
    visible = ends[None, :] <= np.arange(seq_len)[:, None]  # [T, nc]
    probs = masked_softmax(scores, visible)
    out = jnp.einsum("bhtn,bnhd->bthd", probs, vh).astype(q.dtype)
    return out, probs


def selection_weights(config: NSAConfig, compressed: int, blocks: int) -> np.ndarray:
    """`[nc, n_sel]`: how many times Eq. 9 counts compressed block i in selection block j (the
    0-based form of `p_cmp[l'/d j - m - n]`, out-of-range terms dropped)."""
    strides, cover = (config.select_block // config.compress_stride,
                      config.compress_block // config.compress_stride)
    weights = np.zeros((compressed, blocks), np.float32)
    for j in range(blocks):
        for m in range(strides):
            for n in range(cover):
                i = j * strides + m - n
                if 0 <= i < compressed:
                    weights[i, j] += 1
    return weights


def fixed_blocks(blocks: int) -> np.ndarray:
    """`[n_sel, n_sel]` bool: the blocks every query of selection block i reads (Sec. 4.1): the
    initial block 0, the previous block i - 1 and its own block i."""
    i, j = np.arange(blocks)[:, None], np.arange(blocks)
    return (j == 0) | (j == i) | (j == i - 1)


def selected_blocks(p_cmp: jax.Array, kv_heads: int, seq_len: int,
                    config: NSAConfig) -> jax.Array:
    """`[batch, kv_heads, T, n_sel]` bool: the selection blocks each token reads (Eq. 9-11):
    the initial block, its own and the previous block, and the top (n - 3) of the others before
    them by the group's summed scores (all of them when there are fewer)."""
    batch, heads, _, compressed = p_cmp.shape
    blocks = num_blocks(seq_len, config.select_block)
    p_slc = jnp.einsum("bhtn,nj->bhtj", p_cmp, selection_weights(config, compressed, blocks))
    p_slc = p_slc.reshape(batch, kv_heads, heads // kv_heads, seq_len, blocks).sum(axis=2)
    own = np.arange(seq_len) // config.select_block
    j = np.arange(blocks)
    reads = jnp.broadcast_to(fixed_blocks(blocks)[own], (batch, kv_heads, seq_len, blocks))
    picks = min(config.select_blocks - 3, blocks)
    if picks <= 0:
        return reads
    candidates = (j >= 1) & (j < own[:, None] - 1)
    _, top = jax.lax.top_k(jnp.where(candidates, p_slc, -jnp.inf), picks)
    valid = jnp.take_along_axis(jnp.broadcast_to(candidates, reads.shape), top, axis=-1)
    return reads | jnp.any((top[..., None] == j) & valid[..., None], axis=-2)


def window_lists(batch: int, heads: int, seq_len: int, config: NSAConfig) -> jax.Array:
    """`[batch, heads, n, W]` int32: the W = window_slots() blocks ending at each query block
    (-1 before block 0), which hold every key of its queries' windows."""
    n = num_blocks(seq_len, config.select_block)
    slots = min(n, config.window_slots())
    lists = np.arange(n)[:, None] - np.arange(slots)[::-1]
    lists = np.where(lists >= 0, lists, -1).astype(np.int32)
    return jnp.broadcast_to(lists, (batch, heads, n, slots))


class NSAAttention(GroupedQueryAttention):
    """NSA with GroupedQueryAttention's query and output projections and RoPE.

    Parameters: `q`, `o` as the dense layer; `k_<branch>`, `v_<branch>` `[embed, kv_heads,
    head_dim]` for branch in cmp, slc, win; the compression MLPs `<k|v>_compress_pos` `[l,
    head_dim]`, `<k|v>_compress_in` `[l * head_dim, hidden]` (+ bias), `<k|v>_compress_out`
    `[hidden, head_dim]` (+ bias); the gate `gate` `[embed, heads, 3]`, `gate_bias` `[3 heads]`.
    """

    config: NSAConfig = NSAConfig()
    sparse_impl: Impl = "auto"

    def compress(self, x: jax.Array, name: str) -> jax.Array:
        """phi of Eq. 7: `[batch, T, kv_heads, d]` -> `[batch, nc, kv_heads, d]`."""
        cfg, d = self.config, self.head_dim
        hidden = cfg.hidden(d)

        def param(suffix: str, shape: tuple[int, ...], init) -> jax.Array:
            names = (None,) * len(shape)
            value = self.param(f"{name}_compress_{suffix}",
                               nn.with_logical_partitioning(init, names), shape)
            return value.astype(x.dtype)

        std = self.init_std
        pos = param("pos", (cfg.compress_block, d), nn.initializers.normal(std))
        w_in = param("in", (cfg.compress_block * d, hidden), nn.initializers.normal(
            (cfg.compress_block * d) ** -0.5))
        b_in = param("in_bias", (hidden,), nn.initializers.zeros)
        w_out = param("out", (hidden, d), nn.initializers.normal(hidden ** -0.5))
        b_out = param("out_bias", (d,), nn.initializers.zeros)
        blocks = compress_blocks(x, cfg) + pos[:, None, :]  # [b, nc, l, kv, d]
        flat = blocks.transpose(0, 1, 3, 2, 4).reshape(*blocks.shape[:2], x.shape[2], -1)
        return jax.nn.gelu(flat @ w_in + b_in) @ w_out + b_out

    def gates(self, x: jax.Array) -> jax.Array:
        """Eq. 5's g: `[batch, T, embed]` -> `[batch, T, heads, 3]` in (0, 1)."""
        kernel = self.param("gate", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), (axes.EMBED, axes.HEADS, None)),
            (x.shape[-1], self.num_heads, len(BRANCHES)))
        bias = self.param("gate_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, (None,)), (self.num_heads * len(BRANCHES),))
        logits = jnp.einsum("bte,ehc->bthc", x, kernel.astype(x.dtype))
        return jax.nn.sigmoid(logits + bias.reshape(self.num_heads, -1).astype(x.dtype))

    @nn.compact
    def __call__(self, x: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg, (batch, seq_len, _) = self.config, x.shape
        q = checkpoint_name(nn.with_logical_constraint(
            self.project(x, "q", self.num_heads, axes.HEADS), Q_AXES), checkpoint_names.ATTN_Q)
        kv = {}
        for branch in BRANCHES:
            for part, tag in (("k", checkpoint_names.ATTN_K), ("v", checkpoint_names.ATTN_V)):
                y = self.project(x, f"{part}_{branch}", self.num_kv_heads, axes.KV_HEADS)
                kv[part, branch] = checkpoint_name(nn.with_logical_constraint(y, KV_AXES), tag)
        outs = {}
        if cfg.compressed_tokens(seq_len):
            k_cmp, v_cmp = self.compress(kv["k", "cmp"], "k"), self.compress(kv["v", "cmp"], "v")
            outs["cmp"], p_cmp = compressed_attention(q, k_cmp, v_cmp, cfg)
        else:  # no compressed block fits: the branch reads nothing and selects by position
            outs["cmp"] = jnp.zeros_like(q)
            p_cmp = jnp.zeros((batch, self.num_heads, seq_len, 0), jnp.float32)
        q_rope, spec = apply_rope(q, positions, self.rope_theta), kernel_spec(Q_AXES)
        reads = selected_blocks(jax.lax.stop_gradient(p_cmp), self.num_kv_heads, seq_len, cfg)
        reads = jnp.repeat(reads, self.num_heads // self.num_kv_heads, axis=1)
        block_indices, slot_mask, dropped = block_lists(
            reads, block_size=cfg.select_block, slots=cfg.slots(seq_len),
            always=fixed_blocks(num_blocks(seq_len, cfg.select_block)),
            query_block=cfg.query_block)
        self.sow("intermediates", "selection", block_indices)  # benchmarks count keys read
        outs["slc"] = block_sparse_attention(
            q_rope, apply_rope(kv["k", "slc"], positions, self.rope_theta), kv["v", "slc"],
            block_indices, slot_mask, block_size=cfg.select_block, query_block=cfg.query_block,
            shared_group_lists=True, impl=self.sparse_impl, spec=spec)
        outs["win"] = block_sparse_attention(
            q_rope, apply_rope(kv["k", "win"], positions, self.rope_theta), kv["v", "win"],
            window_lists(batch, self.num_heads, seq_len, cfg), None,
            block_size=cfg.select_block, window=cfg.window, shared_group_lists=True,
            impl=self.sparse_impl, spec=spec)
        g = self.gates(x)
        out = sum(g[..., i, None] * outs[branch] for i, branch in enumerate(BRANCHES))
        return self.output(out.astype(x.dtype), x.shape[-1]), {DROPPED: dropped}
