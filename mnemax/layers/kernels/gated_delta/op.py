"""The public gated delta rule: the algorithm (`form`) and the backend (`impl`)."""

from __future__ import annotations

from typing import Literal, get_args

import jax

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.gated_delta.chunk import chunk_gated_delta_rule
from mnemax.layers.kernels.gated_delta.reference import reference

Form = Literal["chunk", "recurrent"]
FORMS = get_args(Form)

# What each value `GatedDeltaConfig.impl` accepts runs, as `(impl, form)`. The first two names
# predate the shared `impl` vocabulary and named the algorithm; "reference" then meant the
# recurrent form, and keeps that meaning here.
CONFIG_IMPLS = {
    "auto": ("auto", "chunk"),
    "chunk": ("reference", "chunk"),
    "recurrent": ("reference", "recurrent"),
    "reference": ("reference", "recurrent"),
    "pallas": ("pallas", "chunk"),
    "pallas_interpret": ("pallas_interpret", "chunk"),
}


def impl_and_form(config_impl: str) -> tuple[str, str]:
    """`(impl, form)` for `gated_delta_rule` from a `GatedDeltaConfig.impl` value."""
    if config_impl not in CONFIG_IMPLS:
        raise ValueError(f"gated delta impl={config_impl!r} is not one of "
                         f"{tuple(CONFIG_IMPLS)}.")
    return CONFIG_IMPLS[config_impl]


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, impl: dispatch.Impl = "auto",
                     form: Form = "chunk") -> tuple[jax.Array, jax.Array | None]:
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
      impl: the backend, `dispatch.IMPLS`: `auto` (XLA until the kernel is measured on a GPU),
        `reference` (XLA), `pallas` (the Triton kernel for the scan over chunks on CUDA,
        interpret mode on CPU), `pallas_interpret`.
      form: the algorithm: `chunk` (chunkwise-parallel, for training) or `recurrent` (a scan
        over tokens; the ground truth, and decoding). Only the chunk form has a kernel.

    Returns:
      `(o: [batch, time, heads, d_v]` in q's dtype, `final_state: [batch, heads, d_k, d_v]` fp32
      if `output_final_state` else None`)`.
    """
    dispatch.check_impl(impl)
    if form not in FORMS:
        raise ValueError(f"gated_delta_rule: form={form!r} is not one of {FORMS}.")
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if form == "recurrent":
        if impl.startswith("pallas"):
            raise ValueError(f"gated_delta_rule: the recurrent form has no Pallas kernel; use "
                             f"form='chunk' with impl={impl!r}, or impl='reference'.")
        return reference(q, k, v, g, beta, **kwargs)
    return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, impl=impl, **kwargs)
