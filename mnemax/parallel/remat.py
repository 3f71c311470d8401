"""Activation rematerialisation policies by name."""

from __future__ import annotations

from collections.abc import Callable

import jax


def remat_options(name: str) -> dict[str, bool | Callable | None]:
    """Keyword arguments for a model's `build(remat=..., remat_policy=...)`.

    `none`: keep every activation (no recompute); `full`: keep only block inputs and recompute
    the rest (Chen et al. 2016); `dots_saveable` and `dots_with_no_batch_dims_saveable`: keep
    matmul outputs, recompute the cheap element-wise ops.
    """
    policies = jax.checkpoint_policies
    table: dict[str, dict[str, bool | Callable | None]] = {
        "none": {"remat": False, "remat_policy": None},
        "full": {"remat": True, "remat_policy": policies.nothing_saveable},
        "dots_saveable": {"remat": True, "remat_policy": policies.dots_saveable},
        "dots_with_no_batch_dims_saveable": {
            "remat": True, "remat_policy": policies.dots_with_no_batch_dims_saveable},
    }
    return table[name]
