"""moba_tiny: `tiny` with MoBA (Lu et al. 2025) as the mixer of every block.

Sequences of 256 (8 per batch: tiny's 2,048 tokens a step) in 4 blocks of 64; each query reads
its own block and the top-1 earlier block by q . mean(K_block) (MoBA's code would call this
`moba_topk=2`), so past the first two blocks a query reads at most 128 of its up to 256 keys.
"""

import dataclasses

from mnemax.layers.sparse_attention import MoBAConfig, SparseAttentionConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    model = dataclasses.replace(base.model, mixers=("moba",), sparse_attention=(
        SparseAttentionConfig(moba=MoBAConfig(block_size=64, topk=1))))
    data = dataclasses.replace(base.data, seq_len=256, global_batch=8)
    return dataclasses.replace(base, name="moba_tiny", model=model, data=data)
