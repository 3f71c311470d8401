"""Configuration of the memory layers: product keys, Memory+, UltraMem(V2), PEER."""

from __future__ import annotations

import dataclasses
import math

from mnemax.errors import ConfigError

VARIANTS = ("pkm", "memory_plus", "ultramem", "peer")
QUERY_NORMS = ("none", "layernorm", "rmsnorm", "batchnorm")
INITS = ("default", "ultramemv2")
PEER_ACTIVATIONS = ("gelu", "none")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """A sparse memory read by product-key retrieval (Lample et al. 2019) and its descendants.

    `pkm`: product-key memory. `memory_plus` (Berges et al. 2024): qk-norm, SiLU-gated output,
    one value table shared by the memory layers. `ultramem` (Huang et al. 2024): Tucker-core
    retrieval and implicit value expansion. `peer` (He 2024): the slots are single-neuron experts.
    UltraMemV2's layout (Huang et al. 2025) is `peer` with `tucker_rank > 0`, a pre-value
    projection (`pre_value_dim`), no expert activation (`peer_activation="none"`, its Eq. 15), one
    linear value projection (`value_dim < d_model`, its Eq. 12), `init="ultramemv2"`, a memory in
    every block (`layers`), `mode="parallel"` and a smaller FFN (`ffn_ratio`).
    """

    variant: str = "pkm"  # pkm | memory_plus | ultramem | peer
    num_rows: int = 65536  # slots N (virtual slots with value_expansion > 1); a perfect square
    num_heads: int = 4  # retrieval heads; their reads are summed
    topk: int = 32  # slots read per head
    key_dim: int = 128  # query width per head, split into two halves of key_dim / 2
    value_dim: int | None = None  # width of a value row; None = d_model; != d_model: projected
    # none | layernorm | rmsnorm (per token) | batchnorm (statistics over batch and time:
    # non-causal, changes with run.grad_accum, unusable for decoding; see check_decodable)
    query_norm: str = "layernorm"
    qk_norm: bool = False  # L2-normalise query halves and sub-keys (cosine scores), Memory+
    gated: bool = False  # out = W_o(silu(W_g x) * memory(x)) ("swilu"), Memory+
    tucker_rank: int = 0  # UltraMem: rank of the Tucker core; 0 = plain row + column sum
    value_expansion: int = 1  # UltraMem: virtual rows per physical row, read through projections
    layers: tuple[int, ...] = ()  # indices of the blocks that hold a memory
    mode: str = "replace"  # replace: memory instead of the block's FFN; parallel: beside it
    ffn_ratio: float = 1.0  # parallel mode: FFN hidden width multiplier (UltraMemV2's knob)
    shared: bool = False  # one value table shared by all memory layers (Memory+)
    value_init_std: float | None = None  # None = 1 / sqrt(value_dim) (keeps reads O(1))
    pre_value_dim: int | None = None  # peer: None = experts read x; d_p = x through one linear
    peer_activation: str = "gelu"  # peer: gelu (PEER) | none (UltraMemV2 drops it, its Eq. 15)
    # default: fan-in stds | ultramemv2: UltraMemV2's variance-matched init (its Sec. 3.5, App. A)
    init: str = "default"
    init_linear_std: float | None = None  # ultramemv2: std of every linear; None = sqrt(0.4 / D)
    impl: str = "auto"  # embedding_bag implementation: auto | reference | pallas

    @property
    def subkeys(self) -> int:
        """Sub-keys per half: sqrt(num_rows)."""
        return math.isqrt(self.num_rows)

    @property
    def physical_rows(self) -> int:
        return self.num_rows // self.value_expansion

    def linear_std(self, fan_in: int, d_model: int) -> float:
        """Init std of a linear layer of the memory: 1 / sqrt(fan_in) (`init="default"`), or for
        `init="ultramemv2"` one std for all of them, `init_linear_std` or the paper's
        sqrt(2 / (5 d_model)) (Nguyen & Salazar's SmallInit, UltraMemV2 App. A)."""
        if self.init == "ultramemv2":
            return self.init_linear_std or (0.4 / d_model) ** 0.5
        return fan_in**-0.5

    def check_decodable(self) -> None:
        """Raises ValueError unless each token's memory read depends only on that token and the
        ones before it, as decoding (generating one token at a time) needs. Decode and generate
        code calls this before it starts."""
        if self.query_norm == "batchnorm":
            raise ValueError(
                "memory.query_norm=batchnorm normalises queries with statistics over the batch "
                "and time, so a token's read depends on later tokens and one decoded token gets "
                "q = 0: this model cannot decode. Train with a per-token norm "
                "(memory.query_norm=layernorm or rmsnorm)")

    def validate(self, d_model: int, num_layers: int) -> None:
        """Raises ValueError naming the field that cannot build a memory."""
        if self.variant not in VARIANTS:
            raise ValueError(f"memory.variant={self.variant!r}: choose one of "
                             f"{', '.join(VARIANTS)}")
        if self.subkeys**2 != self.num_rows:
            raise ValueError(f"memory.num_rows={self.num_rows} is not a perfect square; product "
                             f"keys need N = n^2 (e.g. {self.subkeys**2} or "
                             f"{(self.subkeys + 1) ** 2})")
        if self.topk > self.subkeys:
            raise ValueError(f"memory.topk={self.topk} exceeds the {self.subkeys} sub-keys per "
                             "half; lower topk or raise num_rows")
        if self.key_dim % 2:
            raise ValueError(f"memory.key_dim={self.key_dim} must be even (two halves)")
        if self.query_norm not in QUERY_NORMS:
            raise ValueError(f"memory.query_norm={self.query_norm!r}: choose one of "
                             f"{', '.join(QUERY_NORMS)}")
        if self.mode not in ("replace", "parallel"):
            raise ValueError(f"memory.mode={self.mode!r}: choose replace or parallel")
        if self.num_rows % self.value_expansion:
            raise ValueError(f"memory.num_rows={self.num_rows} is not divisible by "
                             f"memory.value_expansion={self.value_expansion}")
        if self.variant == "peer" and self.value_expansion != 1:
            raise ValueError("memory.variant=peer reads whole experts: set value_expansion=1")
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"memory.layers={self.layers} names blocks {bad} outside the "
                             f"model's {num_layers} layers")
        del d_model
        self._validate_peer_and_init()

    def _validate_peer_and_init(self) -> None:
        """Raises ConfigError for a PEER option or an initialisation that cannot apply."""
        if self.peer_activation not in PEER_ACTIVATIONS:
            raise ConfigError(f"memory.peer_activation={self.peer_activation!r}: choose one of "
                              f"{', '.join(PEER_ACTIVATIONS)}")
        if self.variant != "peer" and self.pre_value_dim is not None:
            raise ConfigError(f"memory.pre_value_dim={self.pre_value_dim} only applies to "
                              f"variant=peer (got variant={self.variant!r}); unset it")
        if self.init not in INITS:
            raise ConfigError(f"memory.init={self.init!r} is not a known initialisation: choose "
                              f"one of {', '.join(INITS)}")
        if self.init != "ultramemv2":
            return
        if self.gated or self.variant == "memory_plus":
            raise ConfigError("memory.init=ultramemv2 derives the output variance of an ungated "
                              "memory; the SiLU gate of memory_plus / gated=true is not covered: "
                              "set init=default or use variant pkm, ultramem or peer")
        if self.variant == "peer" and self.peer_activation != "none":
            raise ConfigError("memory.init=ultramemv2 follows UltraMemV2's activation-free experts "
                              "(its Eq. 15): set memory.peer_activation=none or init=default")
        if self.shared:
            raise ConfigError("memory.init=ultramemv2 sets each layer's value std from that "
                              "layer's shape; a table shared by all layers is not covered: set "
                              "memory.shared=false or init=default")
        if self.value_init_std is not None:
            raise ConfigError(f"memory.value_init_std={self.value_init_std} conflicts with "
                              "init=ultramemv2, which derives the value std: unset one of them")
