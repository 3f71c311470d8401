"""Activation rematerialisation policies by name."""

from __future__ import annotations

from collections.abc import Callable

import jax

from mnemax.parallel.strategy import parse_remat


def remat_options(spec: str) -> dict[str, bool | Callable | None]:
    """Keyword arguments for a model's `build(remat=..., remat_policy=...)`.

    `none`: keep every activation (no recompute); `full`: keep only block inputs and recompute
    the rest (Chen et al. 2016); `dots_saveable` and `dots_with_no_batch_dims_saveable`: keep
    matmul outputs, recompute the cheap element-wise ops; `save_names:a,b`: keep only the
    intermediates layers tagged with those `checkpoint_name`s; `offload_names:a,b`: move those
    to pinned host memory after the forward pass and back for the backward pass.
    """
    policies = jax.checkpoint_policies
    kind, names = parse_remat(spec)
    if kind == "none":
        return {"remat": False, "remat_policy": None}
    if kind == "save_names":
        return {"remat": True, "remat_policy": policies.save_only_these_names(*names)}
    if kind == "offload_names":
        policy = policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
            offload_src="device", offload_dst="pinned_host")
        return {"remat": True, "remat_policy": policy}
    table: dict[str, Callable] = {
        "full": policies.nothing_saveable,
        "dots_saveable": policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
    }
    return {"remat": True, "remat_policy": table[kind]}
