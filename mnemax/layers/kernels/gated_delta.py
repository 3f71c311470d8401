"""The gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025).

Per batch element and head, with a state `S` of shape `[d_k, d_v]` (flash-linear-attention's
orientation: keys index rows)::

    S_t = exp(g_t) * S_{t-1} + k_t u_t^T,   u_t = beta_t * (v_t - exp(g_t) * S_{t-1}^T k_t)
    o_t = S_t^T q_t * scale

which is the paper's `S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T` written for
the transposed state, with `alpha_t = exp(g_t)` (`g_t <= 0` is the log-decay).

The conventions are those of fla's `chunk_gated_delta_rule` so results compare one to one:
`q, k: [batch, time, heads, d_k]`, `v: [batch, time, heads, d_v]`, `g, beta: [batch, time,
heads]`, states `[batch, heads, d_k, d_v]` in fp32, default `scale = d_k ** -0.5`. The op does not
normalise q and k; the layer does.

Backends (`impl`):
- `recurrent` (also `reference`): a `lax.scan` over time in fp32, the readable ground truth.
- `chunk`: the chunkwise-parallel form (WY representation through the UT transform, decays in
  log space, a `lax.scan` carrying the state between chunks). Differentiated by autodiff of a
  rematerialised body, so the backward keeps one `[d_k, d_v]` state per chunk, not per token.
- `pallas`: the chunk form with its scan over chunks in a Pallas Triton kernel
  (`gated_delta_pallas.py`; forward kernel, backward by autodiff of the XLA scan); on platforms
  other than CUDA it runs the kernel in interpret mode. `pallas_interpret`: interpret mode
  everywhere (tests). The kernel has been checked in interpret mode and lowered for CUDA, not yet
  run on a GPU, so `auto` picks `chunk` on every platform for now.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from mnemax.layers.kernels import gated_delta_pallas

GatedDeltaImpl = Literal["auto", "recurrent", "reference", "chunk", "pallas", "pallas_interpret"]
IMPLS = ("auto", "recurrent", "reference", "chunk", "pallas", "pallas_interpret")


def _check_inputs(q, k, v, g, beta, initial_state) -> None:
    """Raise `ValueError` naming the first input whose shape breaks the layout rules."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(
            f"gated_delta_rule: q and k must both be [batch, time, heads, d_k], got q {q.shape} "
            f"and k {k.shape}; reshape them to that layout (heads before the feature dim).")
    batch, time, heads, d_k = q.shape
    if v.ndim != 4 or v.shape[:3] != (batch, time, heads):
        raise ValueError(
            f"gated_delta_rule: v must be [batch, time, heads, d_v] = [{batch}, {time}, {heads}, "
            f"d_v] to match q {q.shape}, got {v.shape}.")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, time, heads):
            raise ValueError(
                f"gated_delta_rule: {name} must be [batch, time, heads] = {(batch, time, heads)}, "
                f"got {x.shape}; it is one scalar per token and head (g in log space).")
    if initial_state is not None and initial_state.shape != (batch, heads, d_k, v.shape[-1]):
        raise ValueError(
            f"gated_delta_rule: initial_state must be [batch, heads, d_k, d_v] = "
            f"{(batch, heads, d_k, v.shape[-1])}, got {initial_state.shape} (fla's orientation: "
            "keys index the rows).")


def _zero_state(q: jax.Array, v: jax.Array) -> jax.Array:
    batch, _, heads, d_k = q.shape
    return jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)


# ---------------------------------------------------------------------------------------------
# One step and the recurrent reference.
# ---------------------------------------------------------------------------------------------


def gated_delta_step(q_t, k_t, v_t, g_t, beta_t, state=None, *, scale=None):
    """One decoding step of the gated delta rule.

    `q_t, k_t: [batch, heads, d_k]`, `v_t: [batch, heads, d_v]`, `g_t, beta_t: [batch, heads]`,
    `state: [batch, heads, d_k, d_v]` (or None for zeros). Returns `(o_t: [batch, heads, d_v]` in
    q's dtype, `new_state` in fp32`)`.
    """
    d_k = q_t.shape[-1]
    scale = d_k**-0.5 if scale is None else scale
    f32 = jnp.float32
    if state is None:
        state = jnp.zeros((*k_t.shape, v_t.shape[-1]), f32)
    q, k, v = q_t.astype(f32), k_t.astype(f32), v_t.astype(f32)
    g, beta = g_t.astype(f32), beta_t.astype(f32)
    s = state.astype(f32) * jnp.exp(g)[..., None, None]
    # The delta rule: replace what the state recalls for k by v, at rate beta.
    u = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", s, k))
    s = s + k[..., :, None] * u[..., None, :]
    o = jnp.einsum("bhkv,bhk->bhv", s, q * scale)
    return o.astype(q_t.dtype), s


def reference(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False):
    """The gated delta rule as a `lax.scan` of `gated_delta_step` over time, in fp32.

    Shapes as in `gated_delta_rule`. Returns `(o: [batch, time, heads, d_v]` in q's dtype,
    `final_state: [batch, heads, d_k, d_v]` fp32 or None`)`.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    state = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, xs):
        o_t, s = gated_delta_step(*xs, s, scale=scale)
        return s, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)]
    state, o = lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 1), (state if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# The chunkwise-parallel form.
# ---------------------------------------------------------------------------------------------
#
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
        a21 = a.reshape(*batch, n, 2, s, n, 2, s)[..., :, 1, :, :, 0, :]
        a21 = jnp.moveaxis(jnp.diagonal(a21, axis1=-4, axis2=-2), -1, -3)
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
    state, o = lax.scan(jax.checkpoint(_chunk_inter), state, xs)
    return o, state


def _inter_scan_kernel_layout(xs, state):
    """`_inter_scan` on the Pallas kernel's layout: `xs` `[bh, n, C, .]`, state `[bh, d_k, d_v]`."""
    o, state = _inter_scan([jnp.moveaxis(x, 1, 0) for x in xs], state)
    return jnp.moveaxis(o, 0, 1), state


_inter_pallas, _inter_pallas_interpret = gated_delta_pallas.with_xla_backward(
    _inter_scan_kernel_layout)


def _inter_scan_pallas(xs, state, *, interpret_only):
    """`_inter_scan` through the Pallas kernel: Triton on GPU, interpret mode elsewhere."""
    n, batch, heads = xs[0].shape[:3]
    flat = [jnp.moveaxis(x, 0, 2).reshape(batch * heads, n, *x.shape[3:]) for x in xs]
    flat_state = state.reshape(batch * heads, *state.shape[2:])
    if interpret_only:
        o, state = _inter_pallas_interpret(flat, flat_state)
    else:
        o, state = lax.platform_dependent(flat, flat_state, cuda=_inter_pallas,
                                          default=_inter_pallas_interpret)
    o = jnp.moveaxis(o.reshape(batch, heads, *o.shape[1:]), 2, 0)
    return o, state.reshape(batch, heads, *state.shape[1:])


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                           output_final_state=False, chunk_size=64, inter="xla"):
    """The chunkwise-parallel gated delta rule; shapes and results as `reference`.

    Any `time` works: the sequence is padded to a multiple of `chunk_size` with `g = beta = k = 0`
    tokens, which leave the state unchanged, and the padding is sliced off the output.
    All arithmetic is fp32; the output is cast back to q's dtype. `inter` runs the scan over
    chunks in `"xla"`, the Pallas kernel (`"pallas"`: Triton on GPU, interpret mode elsewhere)
    or the kernel in interpret mode (`"pallas_interpret"`).
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be >= 1, got {chunk_size}.")
    batch, time, heads, d_k = q.shape
    d_v = v.shape[-1]
    scale = d_k**-0.5 if scale is None else scale
    f32 = jnp.float32
    pad = -time % chunk_size
    n_chunks = (time + pad) // chunk_size

    def to_chunks(x):
        # [b, t, h, ...] -> [n, b, h, C, ...], fp32, zero-padded in time.
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, n_chunks, chunk_size, heads, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    if inter != "xla" and not gated_delta_pallas.supported(chunk_size, d_k, d_v):
        raise ValueError(
            f"gated_delta_rule: the Pallas kernel needs chunk_size, d_k and d_v (or d_v's block "
            f"of {gated_delta_pallas.MAX_BLOCK_V}) to be powers of two >= 16, got chunk_size="
            f"{chunk_size}, d_k={d_k}, d_v={d_v}; use impl='chunk' for these sizes.")
    qc, kc, vc, gc, bc = map(to_chunks, (q, k, v, g, beta))
    # Rematerialised like the scan body: the backward recomputes the [C, C] matrices and the UT
    # transform instead of storing them for every chunk.
    intra = jax.checkpoint(_chunk_intra, static_argnums=(5,))(qc, kc, vc, gc, bc, scale)
    state = _zero_state(q, v) if initial_state is None else initial_state.astype(f32)
    if inter == "xla":
        o, state = _inter_scan(intra, state)
    else:
        o, state = _inter_scan_pallas(intra, state, interpret_only=inter == "pallas_interpret")
    # [n, b, h, C, d_v] -> [b, n * C, h, d_v] -> [b, t, h, d_v]
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(batch, n_chunks * chunk_size, heads, d_v)
    return o[:, :time].astype(q.dtype), (state if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------------------------


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, impl: GatedDeltaImpl = "auto"):
    """The gated delta rule over a whole sequence.

    Args:
      q, k: `[batch, time, heads, d_k]` (L2-normalised by the caller).
      v: `[batch, time, heads, d_v]`.
      g: `[batch, time, heads]` log-decay, `<= 0` (`alpha = exp(g)`).
      beta: `[batch, time, heads]` write strength in `(0, 1)`.
      scale: multiplies `q`; default `d_k ** -0.5`.
      initial_state: `[batch, heads, d_k, d_v]` or None (zeros).
      output_final_state: also return the state after the last token.
      chunk_size: tokens per chunk of the chunk form.
      impl: `auto` (= `chunk`), `recurrent`/`reference`, `chunk`, `pallas` (Triton kernel for
        the scan over chunks on GPU, interpret mode elsewhere), `pallas_interpret`.

    Returns:
      `(o: [batch, time, heads, d_v]` in q's dtype, `final_state: [batch, heads, d_k, d_v]` fp32
      if `output_final_state` else None`)`.
    """
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if impl in ("recurrent", "reference"):
        return reference(q, k, v, g, beta, **kwargs)
    if impl in ("auto", "chunk"):
        return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    if impl in ("pallas", "pallas_interpret"):
        return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, inter=impl,
                                      **kwargs)
    raise ValueError(f"gated_delta_rule: impl must be one of {IMPLS}, got {impl!r}.")
