"""A decoder-only transformer that composes block components (Llama's layout by default).

Pre-norm blocks: RMSNorm -> a mixer (`model.mixers`: causal attention with RoPE, sliding-window
attention, Gated DeltaNet, or any registered one) -> residual, RMSNorm -> the block's FFNs
(SwiGLU, a memory layer in the blocks `model.memory.layers`, or any registered one; their outputs
are summed) -> residual. The components are frozen configs behind one protocol
(`mnemax.layers.components`); this module composes them and names none. Identical blocks are
stacked with `nn.scan` over a `layers` axis (compile time flat in depth); others run in a Python
loop. Each block is optionally wrapped in `nn.remat` with a policy the parallel strategy chooses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.errors import ConfigError, check_choices
from mnemax.layers import axes
from mnemax.layers.attention import AttentionImpl
from mnemax.layers.components import (
    FFNS,
    MIXERS,
    MODEL_STATE,
    STATE_STATS,
    BlockContext,
    Component,
    all_components,
)
from mnemax.layers.components.base import make_param
from mnemax.layers.factored_logits import FactoredLogits
from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.layers.memory import MemoryConfig
from mnemax.layers.mlp import swiglu_hidden_dim
from mnemax.layers.moe import MoEConfig
from mnemax.layers.norms import RMSNorm
from mnemax.layers.sparse_attention.config import SparseAttentionConfig


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a decoder-only transformer and of the components of its blocks."""

    vocab_size: int = 320  # output classes; must be >= the tokenizer's vocabulary
    num_layers: int = 4  # decoder blocks
    d_model: int = 256  # residual stream width
    num_heads: int = 4  # attention heads (query heads unless query_heads is set)
    # Sparse query attention (SQA): query heads of attention blocks, fewer than num_heads, head
    # width still d_model // num_heads; None = num_heads
    query_heads: int | None = None
    num_kv_heads: int | None = None  # key/value heads (GQA); None = num_heads
    head_dim: int | None = None  # per-head width; None = d_model // num_heads
    mlp_dim: int | None = None  # SwiGLU hidden width; None = Llama's 8/3 * d_model rounded to 256
    rope_theta: float = 10_000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # reuse the input embedding as the output projection
    init_std: float = 0.02  # std of weight init; output projections get init_std / sqrt(2 L)
    attention_impl: AttentionImpl = "auto"  # auto (splash on TPU, XLA else) | xla | cudnn | splash
    # nn.scan over blocks (flat compile time) vs a Python loop (also unrolls factored logits)
    scan_layers: bool = True
    # Return `FactoredLogits` (final hidden states and the output matrix) instead of the fp32
    # `[batch, time, vocab]` logits, so the trainer's loss computes them a chunk at a time.
    factored_logits: bool = False
    memory: MemoryConfig | None = None  # memory layers in the blocks memory.layers; None = dense
    moe: MoEConfig | None = None  # mixture-of-experts FFN in the blocks moe.layers; None = dense
    # Sequence mixer of each block, repeated over the depth, by registered name: attention |
    # swa (sliding-window attention) | gdn (Gated DeltaNet) | ... () = attention everywhere.
    mixers: tuple[str, ...] = ()
    sliding_window: int = 512  # window (tokens, itself included) of swa blocks
    gated_delta: GatedDeltaConfig | None = None  # gdn shape; None = heads/head_dim of attention
    # block sizes and top-k of the moba and nsa mixers; None = SparseAttentionConfig()'s defaults
    sparse_attention: SparseAttentionConfig | None = None

    def __post_init__(self) -> None:
        check_choices(self, "model")

    def mixer(self, layer: int) -> str:
        return self.mixers[layer % len(self.mixers)] if self.mixers else "attention"

    @property
    def gdn(self) -> GatedDeltaConfig:
        return self.gated_delta or GatedDeltaConfig(num_heads=self.num_heads,
                                                    head_dim=self.dim_per_head)

    @property
    def sparse(self) -> SparseAttentionConfig:
        return self.sparse_attention or SparseAttentionConfig()

    @property
    def q_heads(self) -> int:
        """Query heads of attention blocks: query_heads (SQA) or num_heads."""
        return self.query_heads or self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or swiglu_hidden_dim(self.d_model)

    def mixer_component(self, layer: int) -> Component:
        """The mixer of block `layer` (`model.mixers` names registered mixers)."""
        name = self.mixer(layer)
        if name not in MIXERS:
            raise ValueError(f"model.mixers has unknown mixer {name!r}; choose one of "
                             f"{', '.join(sorted(MIXERS))}")
        return MIXERS[name].for_block(self, layer)

    def ffn_components(self, layer: int) -> tuple[Component, ...]:
        """The FFNs of block `layer`, in registration order (their outputs are summed)."""
        found = (cls.for_block(self, layer) for cls in dict.fromkeys(FFNS.values()))
        return tuple(c for c in found if c is not None)

    def block_context(self, layer: int) -> BlockContext:
        """What the components of block `layer` see: the model and the dense FFN width after
        every FFN's `dense_ffn_scale` (Memory+ replacing the FFN: 0; UltraMemV2 beside a
        narrower one: round(hidden_dim x ffn_ratio))."""
        scale = math.prod(c.dense_ffn_scale() for c in self.ffn_components(layer))
        width = self.hidden_dim if scale == 1.0 else (max(1, round(self.hidden_dim * scale))
                                                      if scale else 0)
        return BlockContext(model=self, layer=layer, ffn_hidden_dim=width,
                            out_init_std=self.init_std / (2 * self.num_layers) ** 0.5)

    def block_components(self, layer: int) -> tuple[Component, ...]:
        return (self.mixer_component(layer), *self.ffn_components(layer))

    def shared_params(self) -> tuple:
        """Parameters components share across blocks (created once, at the top of the tree)."""
        return tuple(p for cls in all_components() for p in cls.shared_params(self))

    @property
    def uniform_blocks(self) -> bool:
        """All blocks have the same components with the same configs, every one scannable, and
        none shares parameters across blocks: they can be stacked by nn.scan."""
        blocks = {(self.block_components(i), self.block_context(i).ffn_hidden_dim)
                  for i in range(self.num_layers)}
        first = self.block_components(0)
        return (len(blocks) == 1 and all(type(c).scannable for c in first)
                and not self.shared_params())

    def validate(self) -> None:
        """Raises ValueError naming a field whose value cannot build a model."""
        if self.query_heads is not None and not (
                self.kv_heads <= self.query_heads <= self.num_heads
                and self.query_heads % self.kv_heads == 0):
            raise ConfigError(
                f"model.query_heads={self.query_heads} must lie between model.num_kv_heads="
                f"{self.kv_heads} and model.num_heads={self.num_heads} and be a multiple of "
                "num_kv_heads (sparse query attention: fewer query heads, each key/value head "
                "serving a whole group of them); change query_heads or num_kv_heads")
        if self.query_heads is None and self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of "
                f"model.num_kv_heads={self.kv_heads}: each key/value head serves a whole group "
                "of query heads"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads="
                f"{self.num_heads}: set model.head_dim explicitly or change one of them"
            )
        if self.dim_per_head % 2:
            raise ValueError(f"head dim {self.dim_per_head} must be even for RoPE")
        for cls in all_components():
            cls.check_model(self)
        checked: set[Component] = set()
        for layer in range(self.num_layers):
            for component in self.block_components(layer):
                if component not in checked:
                    component.validate(self)
                    checked.add(component)

    def build(self, *, remat: bool = False, remat_policy: Callable | None = None) -> Transformer:
        """The flax module; `remat`/`remat_policy` come from the parallel strategy."""
        self.validate()
        return Transformer(self, remat=remat, remat_policy=remat_policy)

    def param_count(self) -> int:
        """Exact number of parameters: the components of every block, two norms per block,
        the embeddings and the final norm, and each shared parameter once."""
        d, total = self.d_model, 0
        for layer in range(self.num_layers):
            ctx = self.block_context(layer)
            total += 2 * d + sum(c.param_count(ctx) for c in self.block_components(layer))
        total += self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        return total + sum(math.prod(p.shape) for p in self.shared_params())

    def update_model_state(self, state: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        """The model's MODEL_STATE after one step: each block component's `update_state` on its
        own variables (`layer_<i>/<module>` in looped models; `layers/block/<module>`, one block
        at a time, in scanned ones). `stats` is the step's STATE_STATS, same tree."""
        new = dict(state)
        for key, blocks in state.items():
            if key == "layers":  # nn.scan: every leaf has a leading layers axis
                components, update = self.block_components(0), jax.vmap
                blocks, block_stats = blocks["block"], stats.get("layers", {}).get("block", {})
            elif key.startswith("layer_"):
                components, update = self.block_components(int(key[len("layer_"):])), None
                block_stats = stats.get(key, {})
            else:
                raise ValueError(f"model state {key!r} belongs to no block")
            by_module = {c.module_name: c for c in components}
            out = {}
            for module, sub in blocks.items():
                fn = by_module[module].update_state
                sub_stats = block_stats.get(module, {})
                out[module] = (update(fn) if update else fn)(sub, sub_stats)
            new[key] = {"block": out} if key == "layers" else out
        return new

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): each block's
        components (`Component.flops_per_token`) and 6 x the output projection's parameters."""
        total = 6.0 * self.vocab_size * self.d_model
        for layer in range(self.num_layers):
            ctx = self.block_context(layer)
            total += sum(c.flops_per_token(ctx, seq_len) for c in self.block_components(layer))
        return total


# The residual stream between blocks `[batch, time, embed]`.
RESIDUAL_AXES = (axes.ACT_BATCH, axes.ACT_RESIDUAL_LENGTH, axes.ACT_EMBED)


class DecoderBlock(nn.Module):
    """Pre-norm block: `[batch, time, embed] -> ([batch, time, embed], aux)`.

    x + mixer(RMSNorm(x)), then + the sum of the block's FFNs on RMSNorm of that; `aux` merges
    the components' aux dicts. `shared` holds the parameters components share across blocks.
    Decoding (`cache` given: the mixer's cache, `positions` absolute) returns
    `(x, aux, new cache)` from the mixer's `decode` (`mnemax.layers.decoding`).
    """

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 shared: dict[str, jax.Array] | None = None, cache: Any = None) -> tuple:
        cfg, shared = self.config, shared or {}
        ctx = cfg.block_context(self.layer)
        h = RMSNorm(cfg.norm_eps, name="attn_norm")(x)
        mixer = cfg.mixer_component(self.layer)
        if cache is None:
            mixed, aux = mixer.apply(ctx, h, positions, shared)
        else:
            mixed, aux, cache = mixer.decode(ctx, h, positions, shared, cache)
        x = x + mixed
        h = RMSNorm(cfg.norm_eps, name="mlp_norm")(x)
        aux = dict(aux)
        ffn = 0
        for component in cfg.ffn_components(self.layer):
            out, ffn_aux = component.apply(ctx, h, positions, shared)
            if out is not None:  # None: the component sits this block out
                ffn = ffn + out
            aux.update(ffn_aux)
        x = x + ffn
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return (x, aux) if cache is None else (x, aux, cache)


def combine_layer_aux(per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Sums `loss/...` entries over layers and averages metrics over the layers reporting them."""
    out: dict[str, jax.Array] = {}
    for name in sorted({k for aux in per_layer for k in aux}):
        values = [aux[name] for aux in per_layer if name in aux]
        total = sum(values[1:], values[0])
        out[name] = total if name.startswith("loss/") else total / len(values)
    return out


class _ScanBody(nn.Module):
    """Adapts a block to `nn.scan`'s (carry, broadcast) -> (carry, per-layer output) form."""

    config: TransformerConfig
    block: Any

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        return self.block(self.config, name="block")(x, positions)


class Transformer(nn.Module):
    """Tokens `[batch, time]` int32 -> (logits `[batch, time, vocab]` fp32, aux dict), or
    `FactoredLogits` in place of the logits with `config.factored_logits`.

    The compute dtype is the dtype of the parameters passed to `apply` (the trainer casts fp32
    master weights to bf16 for mixed precision); logits are always accumulated in fp32.
    `aux` sums each block's named scalars over layers (empty for a dense model).
    """

    config: TransformerConfig
    remat: bool = False
    remat_policy: Callable | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                         (axes.VOCAB, axes.EMBED)),
            (cfg.vocab_size, cfg.d_model),
        )
        # Gather the table whole before the lookup (FSDP shards it on `embed`): a lookup into an
        # embed-sharded table cannot produce batch-sharded rows without replicating the result.
        # Under tensor parallelism the vocab stays split: each shard looks up its own rows and
        # the partial sums are reduced (Megatron's vocab-parallel embedding) before any
        # sequence-parallel split, which would otherwise make XLA gather the whole table.
        x = jnp.take(nn.with_logical_constraint(embedding, (axes.VOCAB, None)), tokens, axis=0)
        x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)

        scanned = cfg.scan_layers and cfg.uniform_blocks
        block = DecoderBlock
        if self.remat:
            # Inside nn.scan the loop boundary already keeps XLA from merging the backward
            # pass's recomputation with the forward pass; blocks run in a Python loop need
            # prevent_cse, or CSE undoes the remat and every activation is kept.
            block = nn.remat(block, policy=self.remat_policy, prevent_cse=not scanned)
        if scanned:
            stack = nn.scan(
                _ScanBody,
                variable_axes={"params": 0, MODEL_STATE: 0, STATE_STATS: 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )
            x, layer_aux = stack(cfg, block, name="layers")(x, positions)
            # As combine_layer_aux: losses summed over layers, metrics averaged.
            aux = {name: jnp.sum(a, axis=0) if name.startswith("loss/") else jnp.mean(a, axis=0)
                   for name, a in layer_aux.items()}
        else:
            shared = {p.name: make_param(self, p) for p in cfg.shared_params()}
            block_aux = []
            for i in range(cfg.num_layers):
                x, layer_aux = block(cfg, i, name=f"layer_{i}")(x, positions, shared)
                block_aux.append(layer_aux)
            aux = combine_layer_aux(block_aux)

        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            unembed = embedding.T
        else:
            unembed = self.param(
                "unembed",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                             (axes.EMBED, axes.VOCAB)),
                (cfg.d_model, cfg.vocab_size),
            )
        logits = FactoredLogits(x, unembed.astype(x.dtype), unroll=not cfg.scan_layers)
        return (logits if cfg.factored_logits else logits.materialize()), aux
