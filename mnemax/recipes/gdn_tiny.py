"""gdn_tiny: `tiny` with Gated DeltaNet (Yang et al., ICLR 2025) as the mixer of every block."""

import dataclasses

from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    model = dataclasses.replace(base.model, mixers=("gdn",), gated_delta=GatedDeltaConfig(
        num_heads=4, head_dim=64, conv_size=4, chunk_size=64))
    return dataclasses.replace(base, name="gdn_tiny", model=model)
