"""The public gated delta rule: the algorithm (`form`) and the backend (`impl`)."""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import jax
from jax.sharding import PartitionSpec

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.gated_delta.chunk import chunk_gated_delta_rule
from mnemax.layers.kernels.gated_delta.reference import check_inputs, reference

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


def _shards(entry: str | tuple[str, ...] | None) -> int:
    """Devices a PartitionSpec entry splits an axis over, in the mesh in context."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    shape = jax.sharding.get_abstract_mesh().shape
    return math.prod(shape[n] for n in names)


def _per_device(rule, spec: PartitionSpec, q, k, v, g, beta, initial_state,
                output_final_state: bool):
    """`rule` (the unsharded gated delta rule) run per device inside `shard_map`.

    Batch and heads are split as `spec` (`[batch, time, heads, d]`) says; the rule is
    independent per sequence and per head, so no device talks to another. An axis too small to
    split evenly (model.init traces one sequence) is computed whole on every device; the time
    entry is ignored (the recurrence needs the whole sequence).
    """
    check_inputs(q, k, v, g, beta, initial_state)  # before the shapes are read here
    batch, _, heads, _ = q.shape
    entry = lambda i: spec[i] if len(spec) > i else None
    batch_axes = entry(0) if batch % _shards(entry(0)) == 0 else None
    head_axes = entry(2) if heads % _shards(entry(2)) == 0 else None
    act = PartitionSpec(batch_axes, None, head_axes)  # [b, t, h, ...]
    state = PartitionSpec(batch_axes, head_axes)  # [b, h, d_k, d_v]
    with_state = initial_state is not None

    def local(q, k, v, g, beta, *s0):
        o, s = rule(q, k, v, g, beta, initial_state=s0[0] if with_state else None,
                    output_final_state=output_final_state)
        return (o, s) if output_final_state else (o,)

    out = jax.shard_map(
        local, in_specs=(act,) * 5 + (state,) * with_state,
        out_specs=(act, state) if output_final_state else (act,),
        check_vma=False,  # the Pallas kernel's outputs carry no varying-axes annotation
    )(q, k, v, g, beta, *((initial_state,) if with_state else ()))
    return out[0], (out[1] if output_final_state else None)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, impl: dispatch.Impl = "auto",
                     form: Form = "chunk", spec: PartitionSpec | None = None,
                     ) -> tuple[jax.Array, jax.Array | None]:
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
      spec: how `[batch, time, heads, d]` is split over the mesh in context; the rule then runs
        per device inside `shard_map` (XLA cannot partition the kernel's custom call: under
        GSPMD every device would compute the whole batch). None: no mesh, the whole arrays.

    Returns:
      `(o: [batch, time, heads, d_v]` in q's dtype, `final_state: [batch, heads, d_k, d_v]` fp32
      if `output_final_state` else None`)`.
    """
    dispatch.check_impl(impl)
    if form not in FORMS:
        raise ValueError(f"gated_delta_rule: form={form!r} is not one of {FORMS}.")
    if form == "recurrent":
        if impl.startswith("pallas"):
            raise ValueError(f"gated_delta_rule: the recurrent form has no Pallas kernel; use "
                             f"form='chunk' with impl={impl!r}, or impl='reference'.")
        rule = functools.partial(reference, scale=scale)
    else:
        rule = functools.partial(chunk_gated_delta_rule, scale=scale, chunk_size=chunk_size,
                                 impl=impl)
    if spec is None:
        return rule(q, k, v, g, beta, initial_state=initial_state,
                    output_final_state=output_final_state)
    return _per_device(rule, spec, q, k, v, g, beta, initial_state, output_final_state)
