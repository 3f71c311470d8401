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
EXPERT = "expert"  # mixture-of-experts experts (split over the `expert` mesh axis)

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


def mesh_axis_names(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes one `PartitionSpec` entry names (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axis_size(entry: str | tuple[str, ...] | None) -> int:
    """Devices one `PartitionSpec` entry splits over in the mesh in context (1 for None)."""
    import math

    import jax

    shape = jax.sharding.get_abstract_mesh().shape
    return math.prod(shape[n] for n in mesh_axis_names(entry))


def shard_counts(logical: tuple[str | None, ...]) -> tuple[int, ...]:
    """How many ways each axis of an array with these logical axes is split: the product of
    the mesh axes the active logical rules map it to (1 for each axis outside a mesh)."""
    import math

    import flax.linen as nn
    import jax

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return (1,) * len(logical)
    counts = []
    for entry in nn.logical_to_mesh_axes(logical):
        counts.append(math.prod(mesh.shape[n] for n in mesh_axis_names(entry)))
    return tuple(counts)
