"""gdn_h1_tiny: the paper's H1 hybrid on `tiny`: Gated DeltaNet blocks alternating with
sliding-window attention blocks (window 64)."""

import dataclasses

from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    model = dataclasses.replace(base.model, mixers=("gdn", "swa"), sliding_window=64,
                                gated_delta=GatedDeltaConfig(num_heads=4, head_dim=64))
    return dataclasses.replace(base, name="gdn_h1_tiny", model=model)
