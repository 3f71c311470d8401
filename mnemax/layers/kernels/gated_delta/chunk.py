"""The gated delta rule in its chunkwise-parallel form (the training path).

The WY representation through the UT transform, decays in log space, and a `lax.scan` carrying
the state between chunks; differentiated by autodiff of a rematerialised body, so the backward
keeps one `[d_k, d_v]` state per chunk, not per token. The scan over chunks is the part with a
Pallas kernel (`pallas_gpu.py`); `impl` chooses between it and the XLA scan through
`dispatch.select`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.gated_delta import pallas_gpu
from mnemax.layers.kernels.gated_delta.reference import check_inputs, zero_state

# Where `impl="auto"` runs the Triton scan: nowhere yet. It has been checked in interpret mode
# and compiled for sm_90a (no spills), never run on a GPU, so `auto` is the XLA scan.
AUTO_PLATFORMS: tuple[str, ...] = ()

# Inside a chunk of C tokens with cumulative log-decay G_i = g_1 + ... + g_i and start state S0,
# unrolling the recurrence gives, for the "pseudo values" u_i,
#     u_i + sum_{j<i} beta_i exp(G_i - G_j) (k_i . k_j) u_j = beta_i v_i - beta_i exp(G_i) S0^T k_i
# i.e. (I + A) U = diag(beta) V - diag(beta exp(G)) K S0 with A strictly lower triangular.
# Inverting the unit lower-triangular I + A (the UT transform) gives U = U0 - W S0, with
#     U0 = (I + A)^-1 diag(beta) V,   W = (I + A)^-1 diag(beta exp(G)) K,
# and everything else is matrix products:
#     O      = diag(exp(G)) Q S0 + ((Q K^T) * Gamma) U          Gamma_ij = exp(G_i - G_j), i >= j
#     S_next = exp(G_C) S0 + (diag(exp(G_C - G)) K)^T U
# W, U0 and the masked attention matrix of every chunk are computed at once; only the last three
# lines run in the sequential scan over chunks.


def _unit_lower_inverse(a):
    """`(I + a)^-1` for strictly lower-triangular `a: [..., C, C]`, by recursive doubling.

    If `X` inverts the diagonal `s x s` blocks of `L = I + a`, then on each diagonal `2s x 2s`
    block `[[L11, 0], [L21, L22]]` the inverse is `[[X11, 0], [-X22 L21 X11, X22]]`. Starting from
    `1 x 1` blocks (all ones: the diagonal is unit) this takes log2(C) rounds of small batched
    matmuls. It is exact (forward substitution reordered), differentiable, and on CPU hundreds of
    times faster than LAPACK's batched `trsm` for these tiny matrices.
    """
    chunk = a.shape[-1]
    size = 1 << (chunk - 1).bit_length()  # pad to a power of two with an identity block
    if size != chunk:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - chunk)] * 2)
    batch = a.shape[:-2]
    blocks = jnp.ones((*batch, size, 1, 1), a.dtype)  # [..., number of blocks, s, s]
    s = 1
    while s < size:
        n = size // (2 * s)
        x11, x22 = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        # The lower-left s x s block of each diagonal 2s x 2s block of a: [..., n, s, s].
        # Selected and summed, not `jnp.diagonal`: the TPU compiler turns that gather into a
        # while loop. One term of each sum is nonzero, so the result is exact.
        a21 = a.reshape(*batch, n, 2, s, n, 2, s)[..., :, 1, :, :, 0, :]  # [..., n, s, n, s]
        # Built from iotas, not an array constant: a constant would become an extra input of
        # the shard_map the op runs in.
        on_diagonal = (lax.broadcasted_iota(jnp.int32, (n, 1, n, 1), 0)
                       == lax.broadcasted_iota(jnp.int32, (n, 1, n, 1), 2))
        a21 = jnp.sum(jnp.where(on_diagonal, a21, 0.0), axis=-2)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        bottom = jnp.concatenate([-(x22 @ a21 @ x11), x22], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return blocks[..., 0, :chunk, :chunk]


def _chunk_intra(q, k, v, g, beta, scale):
    """Per-chunk quantities that do not depend on the state; inputs `[..., C, d]`, fp32."""
    chunk = g.shape[-1]
    G = jnp.cumsum(g, axis=-1)
    diff = G[..., :, None] - G[..., None, :]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    strict = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
    # Mask before exp: above the diagonal G_i - G_j >= 0 can be large and overflow (and its
    # gradient with it); below it the exponent is <= 0.
    gamma = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    kk = jnp.einsum("...ik,...jk->...ij", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * gamma, 0.0)
    rhs = jnp.concatenate([k * (beta * jnp.exp(G))[..., None], v * beta[..., None]], axis=-1)
    solved = _unit_lower_inverse(a) @ rhs
    d_k = k.shape[-1]
    w, u0 = solved[..., :d_k], solved[..., d_k:]
    attn = jnp.einsum("...ik,...jk->...ij", q * scale, k) * gamma
    q_decayed = q * (scale * jnp.exp(G))[..., None]
    k_decayed = k * jnp.exp(G[..., -1:] - G)[..., None]
    return w, u0, attn, q_decayed, k_decayed, jnp.exp(G[..., -1])


def _chunk_inter(state, xs):
    """One step of the scan over chunks: state `[..., d_k, d_v]`, chunk tensors `[..., C, .]`."""
    w, u0, attn, q_decayed, k_decayed, chunk_decay = xs
    u = u0 - jnp.einsum("...ck,...kv->...cv", w, state)
    o = (jnp.einsum("...ck,...kv->...cv", q_decayed, state)
         + jnp.einsum("...cj,...jv->...cv", attn, u))
    state = chunk_decay[..., None, None] * state + jnp.einsum("...ck,...cv->...kv", k_decayed, u)
    return state, o


def _inter_scan(xs, state):
    """The scan over chunks in XLA: `xs` `[n, ..., C, .]` -> `(o: [n, ..., C, d_v], state)`.

    The body is rematerialised: the backward keeps the inputs and one state per chunk and
    recomputes the rest, instead of storing it for every chunk.
    """
    state, o = lax.scan(jax.checkpoint(_chunk_inter), state, xs, unroll=dispatch.loop_unroll())
    return o, state


def _inter_scan_kernel_layout(xs, state):
    """`_inter_scan` on the Pallas kernel's layout: `xs` `[bh, n, C, .]`, state `[bh, d_k, d_v]`."""
    o, state = _inter_scan([jnp.moveaxis(x, 1, 0) for x in xs], state)
    return jnp.moveaxis(o, 0, 1), state


_inter_pallas, _inter_pallas_interpret = pallas_gpu.with_xla_backward(
    _inter_scan_kernel_layout)


def _inter_scan_pallas(xs, state, *, interpret: bool):
    """`_inter_scan` through the Pallas kernel, compiled (Triton) or in interpret mode."""
    n, batch, heads = xs[0].shape[:3]
    flat = [jnp.moveaxis(x, 0, 2).reshape(batch * heads, n, *x.shape[3:]) for x in xs]
    flat_state = state.reshape(batch * heads, *state.shape[2:])
    o, state = (_inter_pallas_interpret if interpret else _inter_pallas)(flat, flat_state)
    o = jnp.moveaxis(o.reshape(batch, heads, *o.shape[1:]), 2, 0)
    return o, state.reshape(batch, heads, *state.shape[1:])


def _select_inter_scan(impl: str, chunk_size: int, d_k: int, d_v: int):
    """The scan over chunks `impl` asks for: `(xs, state) -> (o, state)`, as `_inter_scan`."""
    dispatch.check_impl(impl)
    supported = pallas_gpu.supported(chunk_size, d_k, d_v)
    if impl in ("pallas", "pallas_interpret") and not supported:
        raise ValueError(
            f"gated_delta_rule: the Pallas kernel needs chunk_size and d_k to be powers of two "
            f">= 16, got chunk_size={chunk_size}, d_k={d_k}; use impl='reference' for these "
            "sizes.")
    kernel = lambda interpret: (functools.partial(_inter_scan_pallas, interpret=interpret)
                                if supported else None)
    return dispatch.select(impl, reference=_inter_scan, gpu=kernel(False), tpu=None,
                           gpu_interpret=kernel(True), tpu_interpret=None,
                           auto_platforms=AUTO_PLATFORMS)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                           output_final_state=False, chunk_size=64, impl="auto"):
    """The chunkwise-parallel gated delta rule; shapes and results as `reference`.

    Any `time` works: the sequence is padded to a multiple of `chunk_size` with `g = beta = k = 0`
    tokens, which leave the state unchanged, and the padding is sliced off the output.
    All arithmetic is fp32; the output is cast back to q's dtype. `impl` (`dispatch.IMPLS`) runs
    the scan over chunks in XLA (`"reference"`, and `"auto"` everywhere until the kernel is
    measured), the Triton kernel (`"pallas"`: Triton on CUDA, interpret mode on CPU, XLA on TPU)
    or the kernel in interpret mode (`"pallas_interpret"`).
    """
    check_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be >= 1, got {chunk_size}.")
    batch, time, heads, d_k = q.shape
    d_v = v.shape[-1]
    inter_scan = _select_inter_scan(impl, chunk_size, d_k, d_v)
    scale = d_k**-0.5 if scale is None else scale
    f32 = jnp.float32
    pad = -time % chunk_size
    n_chunks = (time + pad) // chunk_size

    def to_chunks(x):
        # [b, t, h, ...] -> [n, b, h, C, ...], fp32, zero-padded in time.
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, n_chunks, chunk_size, heads, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    qc, kc, vc, gc, bc = map(to_chunks, (q, k, v, g, beta))
    # Rematerialised like the scan body: the backward recomputes the [C, C] matrices and the UT
    # transform instead of storing them for every chunk.
    intra = jax.checkpoint(_chunk_intra, static_argnums=(5,))(qc, kc, vc, gc, bc, scale)
    state = zero_state(q, v) if initial_state is None else initial_state.astype(f32)
    o, state = inter_scan(intra, state)
    # [n, b, h, C, d_v] -> [b, n * C, h, d_v] -> [b, t, h, d_v]
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(batch, n_chunks * chunk_size, heads, d_v)
    return o[:, :time].astype(q.dtype), (state if output_final_state else None)
