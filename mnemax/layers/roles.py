"""What each parameter is, for the optimizer: decayed or not, dense or sparse learning rate.

The role of a parameter follows from its logical axis names (`mnemax.layers.axes` and the
memory layers' names), never from its leaf name or its rank, so the same weight gets the same
treatment whether the blocks are stacked by `nn.scan` (which prepends a `layers` axis) or run in a
Python loop. A block component whose parameter needs another role gives it an axis of its own
and declares that axis's role (`Component.axis_roles`, see `mnemax.layers.components`).

Roles and why:
- `matrix`: projections and embeddings (any parameter with two or more axes not named below).
  Decayed (AdamW, Loshchilov & Hutter 2019). Also: depthwise short-convolution kernels (`conv`
  axis; a per-channel linear filter, decayed in Mamba's and Gated DeltaNet's reference training,
  which exempt only norms, biases, `A_log`, `dt_bias` and `D`), and routers (a matrix from the
  residual stream to expert logits: decay bounds the logit scale as the z-loss does).
- `scale`: norm gains (`norm` axis). Not decayed: decay pulls a gain towards 0, not towards its
  neutral value 1.
- `vector`: parameters with at most one axis besides `layers` (biases, gates, Gated DeltaNet's
  `A_log` and `dt_bias`). Not decayed: they set per-channel offsets and time constants, whose
  neutral value is not 0.
- `keys`: product-key sub-keys (`memory_keys` axis). Not decayed: a key gets a gradient only
  when a query selects it, so decay would shrink the never-selected keys every step until they
  are never selected (dead slots), the opposite of what the keys are for.
- `core`: UltraMem's Tucker cores (`memory_rank` axis). Not decayed: a few numbers that mix the
  row and column scores; their scale is the score scale, kept near rank one by UltraMem's own
  auxiliary loss, not by decay.
- `table`: memory value tables (`memory_rows` axis). Sparse: each step touches the few rows the
  top-k selected, so they get their own learning rate and no decay (Lample et al. 2019 train
  them with sparse Adam; Berges et al. 2024 with a higher learning rate).
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax

from mnemax.layers import axes, components

Role = Literal["matrix", "scale", "vector", "keys", "core", "table"]

# Roles of the shared axes; components add their own (`Component.axis_roles`: the memory
# layers give memory_rows -> table, memory_keys -> keys, memory_rank -> core).
ROLE_OF_AXIS: dict[str, Role] = {axes.NORM: "scale"}
DECAYED_ROLES: frozenset[str] = frozenset({"matrix"})
SPARSE_ROLES: frozenset[str] = frozenset({"table"})


def role_of(names: tuple[str | None, ...]) -> Role:
    """The role of a parameter with logical axis `names` (see the module docstring)."""
    # Components' roles first: the first axis of a parameter found decides its role.
    for axis, role in {**components.axis_roles(), **ROLE_OF_AXIS}.items():
        if axis in names:
            return role
    own_axes = [n for n in names if n != axes.LAYERS]
    return "matrix" if len(own_axes) >= 2 else "vector"


def param_roles(boxed_params: Any) -> Any:
    """The params' tree with each leaf replaced by its `Role`. `boxed_params` is the tree
    `model.init` returns (leaves `nn.LogicallyPartitioned`, or abstract ones from `eval_shape`);
    a leaf without logical names is a `matrix` or `vector` by its rank."""

    def role(leaf: Any) -> Role:
        if isinstance(leaf, nn.LogicallyPartitioned):
            return role_of(tuple(leaf.names))
        return role_of((None,) * len(leaf.shape))

    return jax.tree.map(role, boxed_params,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
