"""moe_8x_1b: `dense_1b` with a mixture of 8 SwiGLU experts, top-2, in every block (Mixtral's
layout), sized against `memory_plus_1b` for the memory-vs-MoE comparison (UltraMemV2 reports
parity with 8-expert MoE): experts 3,584 wide, so the two a token uses give ~1.0B active
parameters and the eight ~3.1B in all, both within 10% of memory_plus_1b (`mnemax show`).

Softmax router, Switch's balance loss (0.01) and ST-MoE's z-loss (0.001), dropless dispatch
(megablox on TPU: 2048 and 3584 are whole 128-lane tiles). FSDP as dense_1b; expert
parallelism with `--set strategy.mesh=fsdp:F,expert:E`.
"""

import dataclasses

from mnemax.layers.moe import MoEConfig
from mnemax.recipes.dense_1b import recipe as dense_1b


def recipe():
    base = dense_1b()
    moe = MoEConfig(num_experts=8, topk=2, expert_dim=3584, router="softmax",
                    dispatch="dropless", load_balance_weight=0.01, z_loss_weight=0.001,
                    layers=tuple(range(base.model.num_layers)), mode="replace")
    return dataclasses.replace(base, name="moe_8x_1b",
                               model=dataclasses.replace(base.model, moe=moe))
