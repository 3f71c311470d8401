"""Activation rematerialisation and host-offload policies by name.

The model wraps each block in `nn.remat(policy=...)`; this module turns `strategy.remat` into
that policy. Named forms refer to the `checkpoint_name` tags in `mnemax.layers.checkpoint_names`.

Host offload (`offload_names:...`) marks the tagged residuals for a move to the `pinned_host`
memory after the forward pass and back for the backward pass. On GPU and TPU the lowered
program carries these moves (`annotate_device_placement` custom calls with
`_xla_buffer_placement = "pinned_host"`), and XLA's host-offload passes turn them into
device-to-host copies. XLA:CPU has one physical memory: jax lowers the in-jit move to the
identity there, so on CPU `offload_names:a,b` keeps the residuals where they are and behaves
exactly like `save_names:a,b` (same values and gradients; no memory saved).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from mnemax.errors import ConfigError
from mnemax.layers.components import remat_names
from mnemax.parallel.strategy import parse_remat

HOST_MEMORY_KIND = "pinned_host"


def check_names(spec: str, names: tuple[str, ...]) -> None:
    """Raises ConfigError if a name in `strategy.remat=spec` is not a layer's tag."""
    known = remat_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"strategy.remat={spec!r}: {', '.join(map(repr, unknown))} is not a checkpoint name "
            f"any block component tags; known names: {', '.join(known)} "
            "(see mnemax/layers/checkpoint_names.py)"
        )


def remat_options(spec: str) -> dict[str, bool | Callable | None]:
    """Keyword arguments for a model's `build(remat=..., remat_policy=...)`.

    `none`: keep every activation (no recompute); `full`: keep only block inputs and recompute
    the rest (Chen et al. 2016); `dots_saveable` and `dots_with_no_batch_dims_saveable`: keep
    matmul outputs, recompute the cheap element-wise ops; `save_names:a,b`: keep only the
    intermediates layers tagged with those `checkpoint_name`s; `offload_names:a,b`: move those
    to pinned host memory after the forward pass and back for the backward pass (on CPU: kept
    in place, see the module docstring).
    """
    policies = jax.checkpoint_policies
    kind, names = parse_remat(spec)
    check_names(spec, names)
    if kind == "none":
        return {"remat": False, "remat_policy": None}
    if kind == "save_names":
        return {"remat": True, "remat_policy": policies.save_only_these_names(*names)}
    if kind == "offload_names":
        policy = policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
            offload_src="device", offload_dst=HOST_MEMORY_KIND)
        return {"remat": True, "remat_policy": policy}
    table: dict[str, Callable] = {
        "full": policies.nothing_saveable,
        "dots_saveable": policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
    }
    return {"remat": True, "remat_policy": table[kind]}
