"""Logical axis names shared by all layers.

Parameters and activations are annotated with these names; the parallel strategy maps each name
to a mesh axis (or to none). No layer ever names a mesh axis.
"""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
# The sequence axis of the residual stream between blocks: split over the tensor axis by
# sequence parallelism, where everything inside a block needs the whole sequence.
ACT_RESIDUAL_LENGTH = "act_residual_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
