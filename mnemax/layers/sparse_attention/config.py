"""Settings of the sparse attention mixers `moba` and `nsa` (`model.sparse_attention`), and the
block-list sizes and FLOP counts that follow from them."""

from __future__ import annotations

import dataclasses
import math

from mnemax.errors import ConfigError, check_choices
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.dispatch import Impl

PATH = "model.sparse_attention"  # where a recipe holds this config; messages name keys under it


def listed_slots(max_blocks: int | None, exact: int) -> int:
    """Slots L of a query block's list: `exact` (the most blocks its tokens' choices can
    cover) unless `max_blocks` caps it lower."""
    return exact if max_blocks is None else min(max_blocks, exact)


def mean_listed_blocks(n: int, slots: int) -> float:
    """Key blocks a query block reads, averaged over the n query blocks of a causal sequence:
    query block i can list at most its i + 1 blocks 0..i, and at most `slots` of them."""
    return sum(min(i + 1, slots) for i in range(n)) / n


def check_query_block(query_block: int | None, block: int, mixer: str, block_name: str) -> None:
    """A query group lies inside one key block: `query_block` must divide it."""
    if query_block is not None and (query_block < 1 or block % query_block):
        raise ConfigError(f"{PATH}.{mixer}.query_block={query_block} must divide "
                          f"{PATH}.{mixer}.{block_name}={block} (a query group lies inside one "
                          f"key block); use a divisor such as {math.gcd(block, 16)}")


@dataclasses.dataclass(frozen=True)
class MoBAConfig:
    """MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", Sec. 2.2):
    keys in blocks of `block_size`; each query reads its own block (causally) and the `topk`
    strictly earlier blocks with the highest gate score q . mean(K_block).

    MoBA's code counts the own block in its `moba_topk` (moba_efficient.py selects
    `moba_topk - 1` earlier chunks): `topk` here is that minus one.
    """

    block_size: int = 64  # B, tokens per key block (the paper: 512 at 8K, 4096 at 1M)
    topk: int = 2  # earlier blocks each query selects besides its own block
    # Slots L of a query block's list: the union of its B tokens' choices is kept exactly when
    # it fits (None: L = min(blocks, B * topk + 1), always exact; O(T^2) in the worst case);
    # a smaller L keeps each query block's most-chosen blocks and drops the rest of its tokens'
    # choices (counted in the `moba/dropped_choices` metric).
    max_blocks: int | None = None
    # Tokens sharing one block list (a divisor of block_size; None: block_size, MoBA's own
    # grouping). Smaller groups list fewer blocks: the union of fewer tokens' choices.
    query_block: int | None = None

    def slots(self, seq_len: int) -> int:
        n = num_blocks(seq_len, self.block_size)
        tokens = self.query_block or self.block_size
        return listed_slots(self.max_blocks, min(n, tokens * self.topk + 1))

    def keys_read(self, seq_len: int) -> float:
        """Keys each query's block computes scores for, averaged over the sequence: every
        listed block whole (the op reads a block for the whole query block; the slot mask and
        causality only mask scores)."""
        n = num_blocks(seq_len, self.block_size)
        return mean_listed_blocks(n, self.slots(seq_len)) * self.block_size

    def validate(self) -> None:
        for name in ("block_size", "topk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PATH}.moba.{name}={getattr(self, name)} must be >= 1")
        if self.max_blocks is not None and self.max_blocks < 2:
            raise ConfigError(f"{PATH}.moba.max_blocks={self.max_blocks} must be >= 2 (the "
                              "query's own block and at least one chosen block), or None for "
                              "exact lists")
        check_query_block(self.query_block, self.block_size, "moba", "block_size")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
    Sparse Attention", Sec. 3.3): compressed, selected and sliding-window branches with their own
    keys and values, mixed by per-head sigmoid gates (Eq. 5). Defaults: the paper's (Sec. 4.1).
    """

    compress_block: int = 32  # l, keys per compressed token (Eq. 7)
    compress_stride: int = 16  # d, stride between compressed blocks (Eq. 7)
    compress_hidden: int | None = None  # hidden width of the compression MLP; None = head_dim
    select_block: int = 64  # l', keys per selection block (Eq. 9, 12)
    # n, selection blocks per query (Eq. 11), counting the initial block and the 2 local ones
    # the paper always activates
    select_blocks: int = 16
    window: int = 512  # w, sliding-window keys (the query included)
    # Slots of a query group's selection list, as MoBAConfig.max_blocks (None: exact)
    max_blocks: int | None = None
    # Tokens sharing one selection list (a divisor of select_block). The paper's kernel loads
    # each query's own blocks (Sec. 3.4); a list per 64-token block is the union of 64 tokens'
    # choices: at T = 32k the selection read 13,905 keys per query (random parameters), 7,898
    # with groups of 16, against dense attention's 16,385 (benchmarks/RESULTS.md).
    query_block: int = 16

    def slots(self, seq_len: int) -> int:
        n = num_blocks(seq_len, self.select_block)
        exact = min(n, self.query_block * (self.select_blocks - 3) + 3)
        return listed_slots(self.max_blocks, exact)

    def window_slots(self) -> int:
        """Contiguous blocks (of select_block keys) covering a query block's windows: the
        query's own block and the ceil((w - 1) / l') before it."""
        return -(-(self.window - 1) // self.select_block) + 1

    def compressed_tokens(self, seq_len: int) -> int:
        """Compressed blocks [i d, i d + l) inside the sequence: floor((T - l) / d) + 1."""
        if seq_len < self.compress_block:
            return 0
        return (seq_len - self.compress_block) // self.compress_stride + 1

    def mean_compressed_read(self, seq_len: int) -> float:
        """Compressed tokens a query scores, averaged over the sequence: the compressed branch
        is dense over all compressed tokens (the causal mask only masks scores)."""
        return float(self.compressed_tokens(seq_len))

    def keys_read(self, seq_len: int) -> float:
        """Keys the selected and window branches compute scores for per query, averaged over
        the sequence (whole listed blocks, as MoBAConfig.keys_read)."""
        n = num_blocks(seq_len, self.select_block)
        blocks = (mean_listed_blocks(n, self.slots(seq_len))
                  + mean_listed_blocks(n, min(n, self.window_slots())))
        return blocks * self.select_block

    def validate(self, head_dim: int) -> None:
        for name in ("compress_block", "compress_stride", "select_block", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PATH}.nsa.{name}={getattr(self, name)} must be >= 1")
        if self.compress_block % self.compress_stride:
            raise ConfigError(f"{PATH}.nsa.compress_block={self.compress_block} is not a multiple "
                              f"of {PATH}.nsa.compress_stride={self.compress_stride}: Eq. 9 "
                              "scores a selection block from whole strides")
        if self.select_block % self.compress_stride:
            raise ConfigError(f"{PATH}.nsa.select_block={self.select_block} is not a multiple of "
                              f"{PATH}.nsa.compress_stride={self.compress_stride} (Eq. 9)")
        if self.select_blocks < 3:
            raise ConfigError(f"{PATH}.nsa.select_blocks={self.select_blocks} must be >= 3: it "
                              "counts the initial block and the 2 local blocks NSA always reads")
        if self.max_blocks is not None and self.max_blocks < 3:
            raise ConfigError(f"{PATH}.nsa.max_blocks={self.max_blocks} must be >= 3 (the "
                              "initial and 2 local blocks), or None for exact lists")
        check_query_block(self.query_block, self.select_block, "nsa", "select_block")
        if self.compress_hidden is not None and self.compress_hidden < 1:
            raise ConfigError(f"{PATH}.nsa.compress_hidden={self.compress_hidden} must be >= 1 "
                              f"(None = head_dim {head_dim})")

    def hidden(self, head_dim: int) -> int:
        return self.compress_hidden or head_dim


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Settings of the `moba` and `nsa` mixers (used by the blocks whose mixer they are)."""

    moba: MoBAConfig = MoBAConfig()
    nsa: NSAConfig = NSAConfig()
    # block-sparse attention backend (mnemax.layers.kernels.dispatch): auto = the gathered-block
    # XLA path until a kernel is measured faster on a platform
    impl: Impl = "auto"

    def __post_init__(self) -> None:
        check_choices(self, PATH)
