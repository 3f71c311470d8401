"""moba_1b_32k: `dense_1b` with MoBA in every block at 32,768-token sequences.

MoBA (Lu et al. 2025): blocks of 512 keys, each query reads its own block and its top-2 earlier
blocks (`moba_topk=3` in MoBA's code, which counts the own block); a query block's list keeps its 8
most-chosen blocks (`max_blocks`; the rest of its tokens' choices are dropped and counted in
`moba/dropped_choices`), so attention reads at most 8 x 512 = 4,096 keys a query, against
16,384 on average for dense causal attention (7.76 vs 12.68 GFLOP/token in all).

The `seq` mesh axis is refused, so a sequence lives whole on one chip: one 32,768-token sequence
per chip (global batch 8 over fsdp:8, ZeRO-3, full remat). Measured with
`mnemax compile moba_1b_32k --topology v5p:2x2x2`: peak 9.73 GiB per chip of 95 (arguments
1.55, temp 8.18; XLA's heap simulation 7.01 GiB); the same model with dense attention
(`--set model.mixers=attention`: splash), its step compiled the same way, peaks at 10.58 GiB
(heap simulation 7.73 GiB). Both hold a sequence's activations in O(T) memory; MoBA's gain at
this length is compute, not memory. The longest sequence one chip holds, measured the same way
with `--set data.seq_len=...`: 131,072 tokens peak at 31.45 GiB, 262,144 at 76.37 GiB (fits 95;
the gate's O(T^2 / B) scores grow fastest), so 32,768 leaves room for longer runs.
"""

import dataclasses

from mnemax.layers.sparse_attention import MoBAConfig, SparseAttentionConfig
from mnemax.recipes.dense_1b import recipe as dense_1b


def recipe():
    base = dense_1b()
    moba = MoBAConfig(block_size=512, topk=2, max_blocks=8)
    model = dataclasses.replace(base.model, mixers=("moba",),
                                sparse_attention=SparseAttentionConfig(moba=moba))
    data = dataclasses.replace(base.data, seq_len=32768, global_batch=8)
    run = dataclasses.replace(base.run, grad_accum=1)
    return dataclasses.replace(base, name="moba_1b_32k", model=model, data=data, run=run)
