"""swa_tiny: `tiny` with sliding-window attention (the `swa` mixer) in every block.

Sequences of 256 (8 per batch: tiny's 2,048 tokens a step) with a 64-token window (the query
included): 4 windows' length, so most queries see a quarter of a full causal context.
"""

import dataclasses

from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    model = dataclasses.replace(base.model, mixers=("swa",), sliding_window=64)
    data = dataclasses.replace(base.data, seq_len=256, global_batch=8)
    return dataclasses.replace(base, name="swa_tiny", model=model, data=data)
