"""A Llama-style decoder-only transformer (Touvron et al., "LLaMA", 2023).

Pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual, RMSNorm -> SwiGLU ->
residual), stacked with `nn.scan` over a `layers` axis so compile time is flat in depth, each
block optionally wrapped in `nn.remat` with a policy the parallel strategy chooses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers import axes
from mnemax.layers.attention import GroupedQueryAttention
from mnemax.layers.gated_delta import GatedDeltaConfig, GatedDeltaNet
from mnemax.layers.memory import (
    MemoryConfig,
    MemoryLayer,
    memory_flops_per_token,
    memory_param_count,
)
from mnemax.layers.memory.layer import value_table_init, value_width
from mnemax.layers.mlp import SwiGLU, swiglu_hidden_dim
from mnemax.layers.norms import RMSNorm


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a dense decoder-only transformer."""

    vocab_size: int = 320  # output classes; must be >= the tokenizer's vocabulary
    num_layers: int = 4  # decoder blocks
    d_model: int = 256  # residual stream width
    num_heads: int = 4  # query heads
    num_kv_heads: int | None = None  # key/value heads (GQA); None = num_heads
    head_dim: int | None = None  # per-head width; None = d_model // num_heads
    mlp_dim: int | None = None  # SwiGLU hidden width; None = Llama's 8/3 * d_model rounded to 256
    rope_theta: float = 10_000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # reuse the input embedding as the output projection
    init_std: float = 0.02  # std of weight init; output projections get init_std / sqrt(2 L)
    attention_impl: str = "auto"  # auto | xla | cudnn (jax.nn.dot_product_attention backend)
    scan_layers: bool = True  # nn.scan over blocks (flat compile time) vs a Python loop
    memory: MemoryConfig | None = None  # memory layers in the blocks memory.layers; None = dense
    # Sequence mixer of each block, repeated over the depth: attention | swa (sliding-window
    # attention) | gdn (Gated DeltaNet). () = attention everywhere.
    mixers: tuple[str, ...] = ()
    sliding_window: int = 512  # window (tokens, itself included) of swa blocks
    gated_delta: GatedDeltaConfig | None = None  # gdn shape; None = heads/head_dim of attention

    def mixer(self, layer: int) -> str:
        return self.mixers[layer % len(self.mixers)] if self.mixers else "attention"

    @property
    def gdn(self) -> GatedDeltaConfig:
        return self.gated_delta or GatedDeltaConfig(num_heads=self.num_heads,
                                                    head_dim=self.dim_per_head)

    @property
    def uniform_blocks(self) -> bool:
        """All blocks have the same parameters (so they can be stacked by nn.scan)."""
        return not self.memory_layers and len(set(self.mixers)) <= 1

    @property
    def memory_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.memory.layers))) if self.memory else ()

    def ffn_hidden_dim(self, layer: int) -> int | None:
        """SwiGLU width of block `layer`; None when a memory replaces its FFN."""
        if layer not in self.memory_layers:
            return self.hidden_dim
        if self.memory.mode == "replace":
            return None
        return max(1, round(self.hidden_dim * self.memory.ffn_ratio))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or swiglu_hidden_dim(self.d_model)

    def validate(self) -> None:
        """Raises ValueError naming a field whose value cannot build a model."""
        if self.num_heads % self.kv_heads:
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
        if self.memory is not None:
            self.memory.validate(self.d_model, self.num_layers)
        unknown = set(self.mixers) - {"attention", "swa", "gdn"}
        if unknown:
            raise ValueError(f"model.mixers has unknown mixers {sorted(unknown)}; choose "
                             "attention, swa or gdn")
        if "gdn" in self.mixers:
            self.gdn.validate()

    def build(self, *, remat: bool = False, remat_policy: Callable | None = None) -> Transformer:
        """The flax module; `remat`/`remat_policy` come from the parallel strategy."""
        self.validate()
        return Transformer(self, remat=remat, remat_policy=remat_policy)

    def param_count(self) -> int:
        """Exact number of parameters."""
        d, L = self.d_model, self.num_layers
        attn = d * self.dim_per_head * (2 * self.num_heads + 2 * self.kv_heads)
        mixer_params = sum(self.gdn.param_count(d) if self.mixer(i) == "gdn" else attn
                           for i in range(L))
        blocks = mixer_params + 2 * d * L + sum(3 * d * (self.ffn_hidden_dim(i) or 0)
                                                for i in range(L))
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        total = blocks + embed + d
        if self.memory_layers:
            shared = self.memory.shared and self.memory.variant != "peer"
            per_layer = memory_param_count(self.memory, d, include_values=not shared)
            total += len(self.memory_layers) * per_layer
            if shared:
                total += self.memory.physical_rows * value_width(self.memory, d)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), causal attention.

        6 * (matmul parameters, output projection included) + 12 * heads * head_dim * the keys
        each query attends, averaged over positions: (seq_len + 1) / 2 with causal attention (the
        PaLM/Chinchilla count), min(t + 1, W) at position t in a sliding window of W.
        """
        d, L = self.d_model, self.num_layers
        attn = d * self.dim_per_head * (2 * self.num_heads + 2 * self.kv_heads)
        mlp = sum(3 * d * (self.ffn_hidden_dim(i) or 0) for i in range(L))
        attn_layers = [i for i in range(L) if self.mixer(i) != "gdn"]
        matmul_params = len(attn_layers) * attn + mlp + self.vocab_size * d
        gdn = sum(self.gdn.flops_per_token(d) for i in range(L) if self.mixer(i) == "gdn")
        memory = (len(self.memory_layers) * memory_flops_per_token(self.memory, d)
                  if self.memory_layers else 0.0)
        # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add per key a query attends, x 3 for
        # forward + backward.
        keys = sum(mean_keys_attended(seq_len, self.sliding_window if self.mixer(i) == "swa"
                                      else None) for i in attn_layers)
        return 6.0 * matmul_params + 12.0 * keys * self.num_heads * self.dim_per_head + memory + gdn


def mean_keys_attended(seq_len: int, window: int | None = None) -> float:
    """Keys a causal query attends, averaged over positions t = 0..seq_len-1: t + 1, or
    min(t + 1, window) in a sliding window (the window counts the query itself)."""
    w = seq_len if window is None else min(window, seq_len)
    # Positions t < w see t + 1 keys; the seq_len - w later ones see w each.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


# The residual stream between blocks `[batch, time, embed]`.
RESIDUAL_AXES = (axes.ACT_BATCH, axes.ACT_RESIDUAL_LENGTH, axes.ACT_EMBED)


class DecoderBlock(nn.Module):
    """Pre-norm attention + FFN block: `[batch, time, embed] -> ([batch, time, embed], aux)`.

    The FFN is SwiGLU, a memory layer (`layer` in `config.memory.layers`, mode `replace`), or
    both summed (mode `parallel`).
    """

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 shared_values: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        cfg = self.config
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        h = RMSNorm(cfg.norm_eps, name="attn_norm")(x)
        mixer = cfg.mixer(self.layer)
        if mixer == "gdn":
            x = x + GatedDeltaNet(cfg.gdn, name="gdn")(h)[0]
        else:
            x = x + GroupedQueryAttention(
                num_heads=cfg.num_heads,
                num_kv_heads=cfg.kv_heads,
                head_dim=cfg.dim_per_head,
                rope_theta=cfg.rope_theta,
                init_std=cfg.init_std,
                out_init_std=out_std,
                impl=cfg.attention_impl,
                window=cfg.sliding_window if mixer == "swa" else None,
                name="attn",
            )(h, positions)
        h = RMSNorm(cfg.norm_eps, name="mlp_norm")(x)
        aux: dict[str, Any] = {}
        hidden = cfg.ffn_hidden_dim(self.layer)
        ffn = 0
        if hidden is not None:
            ffn = SwiGLU(hidden, cfg.init_std, out_std, name="mlp")(h)
        if self.layer in cfg.memory_layers:
            memory, aux = MemoryLayer(cfg.memory, num_layers=cfg.num_layers,
                                      ffn_hidden_dim=hidden or cfg.hidden_dim,
                                      name="memory")(h, shared_values)
            ffn = ffn + memory
        x = x + ffn
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return x, aux


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
    """Tokens `[batch, time]` int32 -> (logits `[batch, time, vocab]` fp32, aux dict).

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
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )
            x, layer_aux = stack(cfg, block, name="layers")(x, positions)
            aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), layer_aux)
        else:
            shared = None
            if cfg.memory_layers and cfg.memory.shared and cfg.memory.variant != "peer":
                width = value_width(cfg.memory, cfg.d_model)
                shared = self.param("memory_values", value_table_init(cfg.memory, width),
                                    (cfg.memory.physical_rows, width))
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
        logits = jnp.einsum("bte,ev->btv", x, unembed.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(
            logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
        return logits, aux
