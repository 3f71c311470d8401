"""Logits kept as `hidden @ unembed`, so a loss can compute them a slice of tokens at a time.

A language model's fp32 logits are the largest activation of a training step: `dense_1b` at 16
sequences of 2,048 tokens per chip holds `[16, 2048, 32768]` fp32 = 4 GiB, and the backward pass
its gradient beside it. The cross entropy only needs, per token, the log-sum-exp over the vocab
and the target's logit, so it can run over chunks of the sequence under `jax.checkpoint`: the
forward keeps two fp32 numbers per token and the backward recomputes one chunk's logits at a
time (MaxText's `num_vocab_tiling`, Liger's fused linear cross entropy).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mnemax.layers import axes

# A chunk's fp32 logits stay under this many elements per device (1 GiB): logits smaller than
# that are computed whole, as without factoring (dense_1b's default 4 sequences of 2,048 per
# chip); larger ones in chunks (16 sequences per chip: 4 chunks of 512 positions, 0.8 GiB less
# at the peak on v5p).
CHUNK_LOGIT_ELEMENTS = 2**28

LOGITS_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB)


def sequence_chunk(batch: int, seq_len: int, vocab: int,
                   max_elements: int = CHUNK_LOGIT_ELEMENTS) -> int:
    """The largest divisor of `seq_len` whose `[batch, chunk, vocab]` logits (one device's
    share) have at most `max_elements` elements (1 when even a single position is larger)."""
    best = 1
    for chunk in range(1, seq_len + 1):
        if seq_len % chunk == 0 and batch * chunk * vocab <= max_elements:
            best = chunk
    return best


def _logits(hidden: jax.Array, unembed: jax.Array) -> jax.Array:
    logits = jnp.einsum("bte,ev->btv", hidden, unembed, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, LOGITS_AXES)


def log_z_and_target_logit(logits: jax.Array,
                           targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits `[..., v]` fp32 and targets `[...]` -> (logsumexp `[...]`, the target's logit
    `[...]`)."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit through a one-hot mask rather than a gather: the select fuses into the
    # same pass over the logits as the log-sum-exp, and its gradient is an elementwise select
    # where a gather's is a scatter over the whole fp32 logits. It adds exact zeros to the one
    # logit, so the value is the same.
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    return log_z, target_logit


class FactoredLogits(flax.struct.PyTreeNode):
    """Logits `hidden @ unembed` (`[b, t, e] @ [e, v]`, accumulated in fp32), not yet computed.

    `cross_entropy` computes them `chunk` positions at a time (`sequence_chunk`); `materialize`
    gives the whole `[b, t, v]` fp32 array for callers that need it (sampling, tests).
    """

    hidden: jax.Array
    unembed: jax.Array
    # Unroll the loop over chunks (as `scan_layers=False` unrolls the blocks): XLA then sees
    # every chunk, and its cost analysis, which counts a loop body once, counts them all.
    unroll: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hidden.shape[:2], self.unembed.shape[1])

    def materialize(self) -> jax.Array:
        return _logits(self.hidden, self.unembed)

    def cross_entropy(self, targets: jax.Array,
                      max_chunk_elements: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Mean token cross entropy and mean z-loss `(log Z)^2` (fp32 scalars), the same sums as
        over `materialize()` but never holding more than one chunk's logits.

        Args:
          targets: `[b, t]` integer ids in `[0, v)`.
          max_chunk_elements: the most elements of one chunk's logits on one device; None =
            `CHUNK_LOGIT_ELEMENTS`.
        """
        batch, seq_len, vocab = self.shape
        batch_shards, _, vocab_shards = axes.shard_counts(LOGITS_AXES)
        chunk = sequence_chunk(max(batch // batch_shards, 1), seq_len,
                               max(vocab // vocab_shards, 1),
                               max_chunk_elements or CHUNK_LOGIT_ELEMENTS)
        count = batch * seq_len

        def chunk_sums(hidden, chunk_targets):
            logits = _logits(hidden, self.unembed)
            log_z, target_logit = log_z_and_target_logit(logits, chunk_targets)
            return jnp.sum(log_z - target_logit), jnp.sum(jnp.square(log_z))

        if chunk == seq_len:
            ce, z = chunk_sums(self.hidden, targets)
            return ce / count, z / count

        # Nothing of a chunk is saved for the backward pass: it recomputes the chunk's logits.
        chunk_sums = jax.checkpoint(chunk_sums, policy=jax.checkpoint_policies.nothing_saveable)
        n = seq_len // chunk
        hidden = self.hidden.reshape(batch, n, chunk, -1).swapaxes(0, 1)
        chunked_targets = targets.reshape(batch, n, chunk).swapaxes(0, 1)

        def step(totals, xs):
            ce, z = chunk_sums(*xs)
            return (totals[0] + ce, totals[1] + z), None

        zero = jnp.zeros((), jnp.float32)
        (ce, z), _ = jax.lax.scan(step, (zero, zero), (hidden, chunked_targets),
                                    unroll=self.unroll)
        return ce / count, z / count
