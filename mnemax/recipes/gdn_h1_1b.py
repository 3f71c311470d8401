"""gdn_h1_1b: H1 hybrid at 1B scale: Gated DeltaNet and sliding-window attention (window 2048)
alternating over dense_1b's 16 blocks."""

import dataclasses

from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.recipes.dense_1b import recipe as dense_1b


def recipe():
    base = dense_1b()
    model = dataclasses.replace(base.model, mixers=("gdn", "swa"), sliding_window=2048,
                                gated_delta=GatedDeltaConfig(num_heads=16, head_dim=128))
    return dataclasses.replace(base, name="gdn_h1_1b", model=model)
