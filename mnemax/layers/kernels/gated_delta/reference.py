"""The gated delta rule, recurrent: the readable ground truth, and the decoding step.

Per batch element and head, with a state `S` of shape `[d_k, d_v]` (flash-linear-attention's
orientation: keys index rows)::

    S_t = exp(g_t) * S_{t-1} + k_t u_t^T,   u_t = beta_t * (v_t - exp(g_t) * S_{t-1}^T k_t)
    o_t = S_t^T q_t * scale

which is the paper's `S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T` written for
the transposed state, with `alpha_t = exp(g_t)` (`g_t <= 0` is the log-decay). A `lax.scan` over
time in fp32; its backward stores one `[d_k, d_v]` state per token (the chunk form stores one per
chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def check_inputs(q, k, v, g, beta, initial_state) -> None:
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


def zero_state(q: jax.Array, v: jax.Array) -> jax.Array:
    """fp32 zeros `[batch, heads, d_k, d_v]` for `q [batch, time, heads, d_k]`, `v [..., d_v]`."""
    batch, _, heads, d_k = q.shape
    return jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)


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
    check_inputs(q, k, v, g, beta, initial_state)
    state = zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, xs):
        o_t, s = gated_delta_step(*xs, s, scale=scale)
        return s, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)]
    state, o = lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 1), (state if output_final_state else None)
