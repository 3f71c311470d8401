"""moe_tiny: `tiny` with a mixture of 8 SwiGLU experts, top-2 (Mixtral's layout), in place of
every block's FFN.

Experts of width 384: the two a token uses hold as many hidden units as `tiny`'s 768-wide FFN,
so active FLOPs match `tiny` (plus the router) and the blocks hold 4x the FFN parameters.
Softmax router with Switch's balance loss (0.01) and ST-MoE's z-loss (0.001); dropless dispatch.
"""

import dataclasses

from mnemax.layers.moe import MoEConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    moe = MoEConfig(num_experts=8, topk=2, expert_dim=384, router="softmax",
                    dispatch="dropless", load_balance_weight=0.01, z_loss_weight=0.001,
                    layers=tuple(range(base.model.num_layers)), mode="replace")
    return dataclasses.replace(base, name="moe_tiny",
                               model=dataclasses.replace(base.model, moe=moe))
