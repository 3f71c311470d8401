"""moe_fine_tiny: fine-grained experts (DeepSeekMoE, Dai et al. 2024) on `tiny`: 64 experts of
width 96, top-6, plus one always-on shared expert, in place of every block's FFN.

Active hidden units (6 + 1) x 96 = 672, close to `tiny`'s 768. DeepSeek-V3's router: sigmoid
scores, top-6 weights renormalised, the auxiliary-loss-free balancing bias (step 0.001) and only
a small balance loss (its sequence-wise alpha, 0.0001).
"""

import dataclasses

from mnemax.layers.moe import MoEConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    moe = MoEConfig(num_experts=64, topk=6, expert_dim=96, num_shared_experts=1,
                    router="sigmoid", bias_update_rate=0.001, load_balance_weight=0.0001,
                    z_loss_weight=0.001, dispatch="dropless",
                    layers=tuple(range(base.model.num_layers)), mode="replace")
    return dataclasses.replace(base, name="moe_fine_tiny",
                               model=dataclasses.replace(base.model, moe=moe))
