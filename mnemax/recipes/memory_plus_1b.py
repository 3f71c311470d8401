"""memory_plus_1b: `dense_1b` with a Memory+ layer (Berges et al. 2024) in blocks 4, 8 and 12.

One value table of 1024^2 = 1,048,576 rows x 2048 (2.1B parameters) shared by the three blocks,
sharded along its value dimension over all devices; 4 heads x top-32, qk-norm, gated output.
About 1.0B active parameters per token.
"""

import dataclasses

from mnemax.layers.memory import MemoryConfig
from mnemax.recipes.dense_1b import recipe as dense_1b


def recipe():
    base = dense_1b()
    memory = MemoryConfig(variant="memory_plus", num_rows=1024**2, num_heads=4, topk=32,
                          key_dim=512, qk_norm=True, gated=True, shared=True, query_norm="none",
                          layers=(4, 8, 12), mode="replace")
    return dataclasses.replace(
        base, name="memory_plus_1b",
        model=dataclasses.replace(base.model, memory=memory),
        strategy=dataclasses.replace(base.strategy, memory_sharding="dim"),
        optimizer=dataclasses.replace(base.optimizer, sparse_learning_rate=1e-3),
    )
