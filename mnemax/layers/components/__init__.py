"""Block components (mixers and FFNs) behind one protocol (`base.py`), registered by name.

Importing this package registers the built-in ones: `attention` and `swa` (attention.py), `gdn`
(gated_delta.py), `swiglu` (swiglu.py), `memory` (memory.py), `moe` (moe.py), `moba` and `nsa`
(sparse_attention.py).
"""

# Registration order is the order a block sums its FFNs: the dense FFN first, as before the
# components existed (the backward pass accumulates in that order, bit for bit).
from mnemax.layers.components import attention, gated_delta, swiglu  # noqa: F401, I001
from mnemax.layers.components import memory  # noqa: F401
from mnemax.layers.components import moe  # noqa: F401
from mnemax.layers.components import sparse_attention  # noqa: F401
from mnemax.layers.components.base import (
    FFNS,
    MIXERS,
    MODEL_STATE,
    STATE_STATS,
    BlockContext,
    Component,
    SharedParam,
    all_components,
    axis_roles,
    axis_sharding,
    register,
    registered,
    remat_names,
    unregister,
)

__all__ = ["FFNS", "MIXERS", "MODEL_STATE", "STATE_STATS", "BlockContext", "Component",
           "SharedParam", "all_components", "axis_roles", "axis_sharding", "register",
           "registered", "remat_names", "unregister"]
