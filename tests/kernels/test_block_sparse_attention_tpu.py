"""The Pallas TPU block-sparse attention kernels: interpret mode equals the masked dense
reference (forward and gradients), and the kernels compile (Mosaic) for TPU v5e and v5p."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.layers.kernels.block_sparse_attention import pallas_tpu, pallas_tpu_kernels
from mnemax.layers.kernels.block_sparse_attention.masked_reference import (
    masked_attention,
    visible_keys,
)
from mnemax.layers.kernels.dispatch import TPU_CUSTOM_CALL
from tests.kernels.test_tpu_compile import _compile, _mesh

# batch, T (ragged: blocks of 16, 16, 13), q heads, kv heads (GQA group 2), d, block, slots
B, T, H, KH, D, BS, L = 2, 45, 4, 2, 8, 16, 3
NQ = -(-T // BS)


def _lists(rng: np.random.Generator, query_block: int = BS) -> np.ndarray:
    """Distinct random blocks per list of each query group (including blocks after the group,
    which the kernel skips), ~20% of slots unused; batch 1's kv head 1 (q heads 2, 3) never
    lists key block 1 (its dk/dv blocks are visited only by the kernel's no-op triples and must
    be zero); batch 0 head 0 query group 1 lists nothing (its queries read no key: zero
    output)."""
    idx = np.full((B, H, -(-T // query_block), L), -1, np.int32)
    for b, h, i in np.ndindex(*idx.shape[:3]):
        pool = [j for j in range(NQ) if not (b == 1 and h >= 2 and j == 1)]
        chosen = rng.permutation(pool)[:L]
        idx[b, h, i, :len(chosen)] = np.where(rng.random(len(chosen)) < 0.8, chosen, -1)
        idx[b, h, i] = rng.permutation(idx[b, h, i])
    idx[0, 0, 1] = -1
    return idx


# fp32 error budget (interpret mode runs the kernel's fp32 math on the CPU): with q, k, v ~
# N(0, 1) and scale d^-1/2, |s| <~ 5; a d-term fp32 dot errs by <= d u sum|q_i k_i| ~ 8 * 6e-8 *
# 8 = 4e-6 in a score, i.e. a relative error 4e-6 in its softmax weight (exp, log and the online
# rescaling add a few ulp), and a convex combination of |v| <~ 4 then errs by <= 2 * 4e-6 * 4 =
# 3e-5. A gradient entry sums <= 2 * 45 terms (two q heads per kv head, 45 keys or queries) each
# off by ~4e-6 of itself: <= 90 * 4e-6 = 4e-4 of the largest term, and the terms of one entry
# share signs little, so 2e-4 of the gradient's largest entry. A kernel that drops or adds one
# visible key (weight ~1/20), or misplaces one block, moves values by O(0.05) of their scale.
FWD_ATOL, GRAD_RTOL = 5e-5, 2e-4
# Interpret mode makes large XLA:CPU programs; unoptimized code compiles in ~40% of the time
# (measured 2.9 s vs 6.8 s) and runs these shapes in well under a second either way.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize(("window", "query_block"), [(None, BS), (20, 8)])
def test_interpret_equals_masked_reference(window, query_block, monkeypatch):
    """Random lists with -1 slots, random slot masks (window None) or none (window 20, which
    spans two blocks), GQA, ragged T, three key blocks: output, dq, dk, dv. Window 20: query
    groups of 8 tokens (6 lists, the last of 5 tokens), and SMEM shrunk to 63 words so that the
    kernels run in several calls: forward and dq one per (batch row, GQA group) (2 x 18 words),
    dk/dv one per q head (54 + 9 words), summed over each GQA group."""
    if window is not None:
        monkeypatch.setattr(pallas_tpu, "SMEM_WORDS", 63)
    rng = np.random.default_rng(0 if window is None else 1)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, H, D), (B, T, KH, D), (B, T, KH, D)))
    idx = jnp.asarray(_lists(rng, query_block))
    mask = jnp.asarray(rng.random((B, H, T, L)) < 0.7) if window is None else None
    d_out = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)

    def value_and_grads(attend):
        def loss(q, k, v):
            out = attend(q, k, v)
            return jnp.sum(out * d_out), out

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                       compiler_options=FAST_CPU_COMPILE)(q, k, v)

    (_, out), grads = value_and_grads(lambda q, k, v: pallas_tpu.attention(
        q, k, v, idx, mask, block_size=BS, window=window, interpret=True,
        query_block=query_block))
    (_, ref), ref_grads = value_and_grads(lambda q, k, v: masked_attention(
        q, k, v, idx, mask, block_size=BS, window=window, query_block=query_block))

    # the case exercises what it claims: skipped slots, partial visibility, queries reading
    # nothing (zero output), unread key blocks (zero dk), groups of a block listing differently
    visible = np.asarray(visible_keys(idx, mask, T, BS, window, query_block))
    if query_block < BS:
        assert np.any(np.asarray(idx[:, :, 0:4:2] != idx[:, :, 1:4:2]))
    reads = visible.any(-1)
    assert (~reads).any() and reads.mean() > 0.5
    np.testing.assert_array_equal(np.asarray(out)[~reads.transpose(0, 2, 1)], 0.0)
    assert float(jnp.max(jnp.abs(ref_grads[1][1, BS:2 * BS, 1]))) == 0.0

    np.testing.assert_allclose(out, ref, rtol=0, atol=FWD_ATOL)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g, r, rtol=0, atol=GRAD_RTOL * scale, err_msg=name)


@pytest.mark.parametrize(("smem", "calls"), [(10_000, 1), (130, 2), (59, 6), (20, 12)])
def test_chunks_cover_every_head_once_within_smem(smem, calls, monkeypatch):
    """Kernel calls split (batch, q heads) so that each call's scalar-prefetch words fit SMEM:
    batch rows (3 x 2 kv heads x (2 x 12 + 6) = 180 words), kv-head groups (30 words), parts of
    one group (24 + 6 words; never across groups, whose dk/dv it sums)."""
    monkeypatch.setattr(pallas_tpu, "SMEM_WORDS", smem)
    batch, heads, group, per_q, per_kv = 3, 4, 2, 12, 6
    chunks = pallas_tpu._chunks(batch, heads, group, per_q, per_kv)
    assert len(chunks) == calls
    covered = np.zeros((batch, heads), int)
    for b0, b1, n0, n1 in chunks:
        covered[b0:b1, n0:n1] += 1
        kv_heads = (n1 - 1) // group - n0 // group + 1
        assert (b1 - b0) * ((n1 - n0) * per_q + kv_heads * per_kv) <= smem
        assert n1 - n0 >= group or n0 // group == (n1 - 1) // group
    np.testing.assert_array_equal(covered, 1)
    with pytest.raises(ConfigError, match="SMEM words"):
        pallas_tpu._chunks(batch, heads, group, smem, per_kv)


@pytest.mark.parametrize(("d", "block", "slots", "query_block", "words"), [
    (128, 40, 4, None, "block_size=40 is not a multiple of 16"), (96, 128, 4, None, "head dim 96"),
    (128, 128, 33, None, "33 slots"), (128, 256, 4, 8, "query_block=8 is not a multiple of 16"),
    (128, 256, 4, 96, "query_block=96 must divide block_size=256")])
def test_unsupported_shapes_raise(d, block, slots, query_block, words):
    q = jnp.zeros((1, 240, 2, d), jnp.bfloat16)
    k = jnp.zeros((1, 240, 1, d), jnp.bfloat16)
    idx = jnp.zeros((1, 2, -(-240 // (query_block or block)), slots), jnp.int32)
    with pytest.raises(ConfigError, match=words):
        pallas_tpu.attention(q, k, k, idx, block_size=block, query_block=query_block)


# Compile-only: bf16, d = 128, L = 4, GQA 8 -> 2 heads, several query groups; block 128 at a
# ragged T (8 blocks, the last of 104 tokens), NSA's blocks of 64 with query groups of 16 at
# T = 512 (8 key blocks, 32 groups: 16-row query tiles, per-query rows of 16 lanes). The
# three kernels alone, on their heads-major operands: the XLA glue around them (layouts, the
# triples' sort) cannot fail Mosaic and took ~3 s more per shape to compile.
COMPILE_SHAPES = [(128, 1000, None), (64, 512, 16)]


@pytest.mark.parametrize("generation", ["v5e", "v5p"])
def test_kernels_compile_for_tpu(generation):
    """The forward, dq and dk/dv kernels compile (Mosaic) for the chip at both shapes."""
    mesh = _mesh(generation)
    batch, heads, kv_heads, d, slots = 2, 8, 2, 128, 4
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    for block, seq_len, query_block in COMPILE_SHAPES:
        tp = -(-seq_len // block) * block
        qb = query_block or block
        nq = tp // qb
        st = pallas_tpu_kernels.Statics(block, None, d ** -0.5, interpret=False,
                                        query_block=query_block)
        row = (batch, heads, pallas_tpu_kernels.row_groups(nq), qb)
        codes, rows = ((batch, heads, nq, slots), i32), (row, f32)
        q, kv = (batch, heads, tp, d), (batch, kv_heads, tp, d)
        backward = [(q, bf16), (kv, bf16), (kv, bf16), (q, bf16), rows, rows, (row, i32), codes]
        kernels = [
            (pallas_tpu_kernels.forward, (q, bf16), (kv, bf16), (kv, bf16), codes, (row, i32)),
            (pallas_tpu_kernels.d_query, *backward),
            (pallas_tpu_kernels.d_key_value, *backward),
        ]
        for name, (fn, *shapes) in zip(("forward", "dq", "dk/dv"), kernels, strict=True):
            text, seconds = _compile(mesh, functools.partial(fn, st=st), *shapes)
            print(f"{generation} block {block} query_block {qb} T {seq_len} {name}: compiled in "
                  f"{seconds:.1f} s")
            assert text.count(f'custom_call_target="{TPU_CUSTOM_CALL}"') == 1, name
