"""gdn_1b: a ~1.5B Gated DeltaNet (every block), dense_1b's width and depth, for GPUs.

16 key heads of 128 with 32 value heads of 128 (more value heads than key heads, as the paper's
larger models), chunk 64.
"""

import dataclasses

from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.recipes.dense_1b import recipe as dense_1b


def recipe():
    base = dense_1b()
    model = dataclasses.replace(base.model, mixers=("gdn",), gated_delta=GatedDeltaConfig(
        num_heads=16, num_value_heads=32, head_dim=128, conv_size=4, chunk_size=64))
    return dataclasses.replace(base, name="gdn_1b", model=model)
