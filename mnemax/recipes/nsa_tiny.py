"""nsa_tiny: `tiny` with NSA (Yuan et al. 2025) as the mixer of every block.

Sequences of 256 (8 per batch: tiny's 2,048 tokens a step). The paper's l = 32, d = 16,
l' = 64, n = 16, w = 512 (Sec. 4.1) scaled by 1/4 in length: compressed blocks of 16 keys at
stride 8, 8 selection blocks of 32 of which each query reads 5 (the initial block, its own and
the previous one, and the top 2 by the compressed branch's scores), a 128-key sliding window.
"""

import dataclasses

from mnemax.layers.sparse_attention import NSAConfig, SparseAttentionConfig
from mnemax.recipes.tiny import recipe as tiny


def recipe():
    base = tiny()
    nsa = NSAConfig(compress_block=16, compress_stride=8, select_block=32, select_blocks=5,
                    window=128)
    model = dataclasses.replace(base.model, mixers=("nsa",),
                                sparse_attention=SparseAttentionConfig(nsa=nsa))
    data = dataclasses.replace(base.data, seq_len=256, global_batch=8)
    return dataclasses.replace(base, name="nsa_tiny", model=model, data=data)
