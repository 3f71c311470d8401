"""Configuration of the memory layers: product keys, Memory+, UltraMem(V2), PEER."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from mnemax.errors import ConfigError, check_block_indices, check_choices
from mnemax.layers.kernels.dispatch import Impl

MemoryVariant = Literal["pkm", "memory_plus", "ultramem", "peer"]
QueryNorm = Literal["none", "layernorm", "rmsnorm", "batchnorm"]
MemoryMode = Literal["replace", "parallel"]
PeerActivation = Literal["gelu", "none"]
MemoryInit = Literal["default", "ultramemv2"]
SlotWeights = Literal["auto", "softmax", "scores"]

VARIANTS = get_args(MemoryVariant)
QUERY_NORMS = get_args(QueryNorm)
MODES = get_args(MemoryMode)
PEER_ACTIVATIONS = get_args(PeerActivation)
INITS = get_args(MemoryInit)
PATH = "model.memory"  # where a recipe holds this config; error messages name keys under it


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

    variant: MemoryVariant = "pkm"
    num_rows: int = 65536  # slots N (virtual slots with value_expansion > 1); a perfect square
    num_heads: int = 4  # retrieval heads; their reads are summed
    topk: int = 32  # slots read per head
    key_dim: int = 128  # query width per head, split into two halves of key_dim / 2
    value_dim: int | None = None  # width of a value row; None = d_model; != d_model: projected
    # none | layernorm | rmsnorm (per token) | batchnorm (statistics over batch and time:
    # non-causal, changes with run.grad_accum, unusable for decoding; see check_decodable)
    query_norm: QueryNorm = "layernorm"
    qk_norm: bool = False  # L2-normalise query halves and sub-keys (cosine scores), Memory+
    gated: bool = False  # out = W_o(silu(W_g x) * memory(x)) ("swilu"), Memory+
    tucker_rank: int = 0  # UltraMem: rank of the Tucker core; 0 = plain row + column sum
    tucker_cores: int = 1  # UltraMem's multi-core scoring: C cores, value rows split in C parts
    # UltraMem's core penalty alpha/(r-1) sum_{i>=2} max(0, lambda_i - tau)^2 (aux
    # `loss/memory_tucker_core`); 0 = off (UltraMemV2 Sec. 4.2.7 drops it)
    tucker_penalty: float = 0.0
    tucker_margin: float = 0.15  # tau of the core penalty (UltraMem's reference code)
    # auto: raw scores for ultramem (its Eq. 5 / reference code), softmax for the others
    slot_weights: SlotWeights = "auto"
    value_expansion: int = 1  # UltraMem: virtual rows per physical row, read through projections
    layers: tuple[int, ...] = ()  # indices of the blocks that hold a memory
    mode: MemoryMode = "replace"  # replace: memory instead of the FFN; parallel: beside it
    ffn_ratio: float = 1.0  # parallel mode: FFN hidden width multiplier (UltraMemV2's knob)
    shared: bool = False  # one value table shared by all memory layers (Memory+)
    value_init_std: float | None = None  # None = 1 / sqrt(value_dim) (keeps reads O(1))
    pre_value_dim: int | None = None  # peer: None = experts read x; d_p = x through one linear
    peer_activation: PeerActivation = "gelu"  # peer: gelu (PEER); none (UltraMemV2, its Eq. 15)
    # default: fan-in stds | ultramemv2: UltraMemV2's variance-matched init (its Sec. 3.5, App. A)
    init: MemoryInit = "default"
    init_linear_std: float | None = None  # ultramemv2: std of every linear; None = sqrt(0.4 / D)
    impl: Impl = "auto"  # embedding_bag backend (see mnemax.layers.kernels.dispatch)

    def __post_init__(self) -> None:
        check_choices(self, PATH)

    @property
    def subkeys(self) -> int:
        """Sub-keys per half: sqrt(num_rows)."""
        return math.isqrt(self.num_rows)

    @property
    def physical_rows(self) -> int:
        return self.num_rows // self.value_expansion

    @property
    def weighting(self) -> Literal["softmax", "scores"]:
        """How a head's k slot scores weight the values: `softmax` (PKM, Memory+, PEER) or the
        raw `scores` (UltraMem and UltraMemV2, see `retrieval`)."""
        if self.slot_weights != "auto":
            return self.slot_weights
        return "scores" if self.variant == "ultramem" else "softmax"

    def linear_std(self, fan_in: int, d_model: int) -> float:
        """Init std of a linear layer of the memory: 1 / sqrt(fan_in) (`init="default"`), or for
        `init="ultramemv2"` one std for all of them, `init_linear_std` or the paper's
        sqrt(2 / (5 d_model)) (Nguyen & Salazar's SmallInit, UltraMemV2 App. A)."""
        if self.init == "ultramemv2":
            return self.init_linear_std or (0.4 / d_model) ** 0.5
        return fan_in**-0.5

    def check_decodable(self) -> None:
        """Raises ConfigError unless each token's memory read depends only on that token and the
        ones before it, as decoding (generating one token at a time) needs. Decode and generate
        code calls this before it starts."""
        if self.query_norm == "batchnorm":
            raise ConfigError(
                f"{PATH}.query_norm=batchnorm normalises queries with statistics over the batch "
                "and time, so a token's read depends on later tokens and one decoded token gets "
                "q = 0: this model cannot decode. Train with a per-token norm "
                f"({PATH}.query_norm=layernorm or rmsnorm)")

    def validate(self, d_model: int, num_layers: int) -> None:
        """Raises ConfigError naming the field (by its override path, `model.memory.topk`) that
        cannot build a memory."""
        check_choices(self, PATH)
        if self.subkeys**2 != self.num_rows:
            raise ConfigError(f"{PATH}.num_rows={self.num_rows} is not a perfect square; product "
                              f"keys need N = n^2 (e.g. {self.subkeys**2} or "
                              f"{(self.subkeys + 1) ** 2})")
        if self.topk > self.subkeys:
            raise ConfigError(f"{PATH}.topk={self.topk} exceeds the {self.subkeys} sub-keys per "
                              f"half; lower topk or raise {PATH}.num_rows")
        if self.key_dim % 2:
            raise ConfigError(f"{PATH}.key_dim={self.key_dim} must be even (two halves)")
        if self.num_rows % self.value_expansion:
            raise ConfigError(f"{PATH}.num_rows={self.num_rows} is not divisible by "
                              f"{PATH}.value_expansion={self.value_expansion}")
        if self.variant == "peer" and self.value_expansion != 1:
            raise ConfigError(f"{PATH}.variant=peer reads whole experts: set "
                              f"{PATH}.value_expansion=1")
        check_block_indices(PATH, self.layers, num_layers)
        self._validate_tucker(d_model)
        self._validate_peer_and_init()

    def _validate_tucker(self, d_model: int) -> None:
        """Raises ConfigError for a Tucker (UltraMem) option that cannot apply."""
        if self.tucker_rank < 0 or self.tucker_cores < 1:
            raise ConfigError(f"{PATH}.tucker_rank={self.tucker_rank} and {PATH}.tucker_cores="
                              f"{self.tucker_cores} must be >= 0 and >= 1")
        if self.tucker_rank == 0 and (self.tucker_cores > 1 or self.tucker_penalty):
            raise ConfigError(f"{PATH}.tucker_cores / tucker_penalty need Tucker retrieval: set "
                              f"{PATH}.tucker_rank >= 2 or leave them at 1 / 0")
        if self.tucker_penalty and self.tucker_rank < 2:
            raise ConfigError(f"{PATH}.tucker_penalty penalises singular values 2..r of the core: "
                              f"it needs {PATH}.tucker_rank >= 2")
        if self.tucker_rank and self.query_norm != "layernorm":
            raise ConfigError(f"{PATH}.query_norm={self.query_norm} with tucker_rank > 0: "
                              "UltraMem's retrieval LayerNorms queries and keys (with a gain); "
                              f"set {PATH}.query_norm=layernorm")
        if self.tucker_rank and self.qk_norm:
            raise ConfigError(f"{PATH}.qk_norm=true is Memory+'s cosine scoring; with "
                              f"tucker_rank > 0 queries and keys are LayerNormed: unset one")
        if self.tucker_cores > 1 and self.variant == "peer":
            raise ConfigError(f"{PATH}.tucker_cores={self.tucker_cores} splits embedding value "
                              f"rows; PEER experts are read whole: set {PATH}.tucker_cores=1")
        if (self.value_dim or d_model) % self.tucker_cores:
            raise ConfigError(f"{PATH}.value_dim={self.value_dim or d_model} is not divisible by "
                              f"{PATH}.tucker_cores={self.tucker_cores} (one part per core)")

    def _validate_peer_and_init(self) -> None:
        """Raises ConfigError for a PEER option or an initialisation that cannot apply."""
        if self.variant != "peer" and self.pre_value_dim is not None:
            raise ConfigError(f"{PATH}.pre_value_dim={self.pre_value_dim} only applies to "
                              f"variant=peer (got variant={self.variant!r}); unset it")
        if self.init != "ultramemv2":
            return
        if self.gated or self.variant == "memory_plus":
            raise ConfigError(f"{PATH}.init=ultramemv2 derives the output variance of an ungated "
                              "memory; the SiLU gate of memory_plus / gated=true is not covered: "
                              "set init=default or use variant pkm, ultramem or peer")
        if self.variant == "peer" and self.peer_activation != "none":
            raise ConfigError(f"{PATH}.init=ultramemv2 follows UltraMemV2's activation-free "
                              f"experts (its Eq. 15): set {PATH}.peer_activation=none or "
                              "init=default")
        if self.shared:
            raise ConfigError(f"{PATH}.init=ultramemv2 sets each layer's value std from that "
                              "layer's shape; a table shared by all layers is not covered: set "
                              f"{PATH}.shared=false or init=default")
        if self.value_init_std is not None:
            raise ConfigError(f"{PATH}.value_init_std={self.value_init_std} conflicts with "
                              "init=ultramemv2, which derives the value std: unset one of them")
