"""The block-sparse attention op (gathered-block XLA path and the GPU kernel in interpret mode)
against the dense masked reference, forward and gradients w.r.t. q, k, v, with one list per key
block (query_block = block_size) and per smaller query group (query_block 16 in blocks of 32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels.block_sparse_attention import (
    block_sparse_attention,
    blocks,
    gpu_layout,
    masked_attention,
    pallas_gpu,
)
from mnemax.layers.kernels.block_sparse_attention.masked_reference import visible_keys

# fp32 error bound, relative to the largest entry of the reference: every output and gradient
# entry is a sum over at most d + L * B products computed in another order (the scores over d,
# then softmax-weighted sums over the L * B listed keys); each reordered sum of m terms is off
# by at most m * u * (sum of |terms|) with u = 2^-24, and the sums of |terms| here are within a
# few times the largest entry (softmax weights are in [0, 1] and sum to 1; scores are O(1)).
# With m = d + L * B and a factor 8 for exp, the division and the chained products of the
# backward pass: 8 * (16 + 96) * 2^-24 = 5.3e-5 at d = 16. A missing mask, a wrong block or a
# wrong kv head moves entries by O(0.1) of the largest.
SEQ, BLOCK, SLOTS, HEADS, KV_HEADS, D = 72, 32, 3, 4, 2, 16  # ragged: 3 key blocks, 8 tokens
QUERY_BLOCK = 16  # the smaller query groups: 5 lists over 72 tokens, the last of 8


def _tol(d: int) -> float:
    return 8 * (d + SLOTS * BLOCK) * 2.0 ** -24


def _case(seed: int, batch: int = 2, d: int = D, query_block: int = BLOCK,
          shared: bool = False):
    """Random q, k, v, output cotangent, distinct block lists of each query group (some -1
    slots, an all -1 list, future blocks that causality hides; `shared`: one list per GQA
    group, copied to its heads) and slot masks (per head)."""
    rng = np.random.default_rng(seed)
    n, groups = -(-SEQ // BLOCK), -(-SEQ // query_block)
    idx = np.full((batch, HEADS, groups, SLOTS), -1)
    for b, h, i in np.ndindex(batch, HEADS, groups):
        chosen = rng.choice(n, size=rng.integers(0, SLOTS + 1), replace=False)
        idx[b, h, i, rng.choice(SLOTS, size=len(chosen), replace=False)] = chosen
    idx[0, 0, 1] = -1  # a query block that reads nothing
    idx[0, 1, 2] = [2, 1, 0]  # and one that lists everything
    if shared:
        idx[:, 1::2] = idx[:, 0::2]
    mask = rng.random((batch, HEADS, SEQ, SLOTS)) < 0.7
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, ct = normal(batch, SEQ, HEADS, d), normal(batch, SEQ, HEADS, d)
    k, v = normal(batch, SEQ, KV_HEADS, d), normal(batch, SEQ, KV_HEADS, d)
    return q, k, v, jnp.asarray(idx, jnp.int32), jnp.asarray(mask), ct


# Bound by XLA:CPU compile time; LLVM's optimisation passes are most of it and buy nothing at
# these sizes (as tests/kernels/test_gated_delta.py).
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_CPU_COMPILE)
def _out_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct))


@functools.cache
def _reference(window: int | None, d: int, query_block: int = BLOCK, shared: bool = False):
    """The case of seed 0 and the dense reference's output and gradients on it (computed once
    for the tests of both paths)."""
    q, k, v, idx, mask, ct = case = _case(0, d=d, query_block=query_block, shared=shared)
    ref = functools.partial(masked_attention, block_indices=idx, slot_mask=mask,
                            block_size=BLOCK, window=window, query_block=query_block)
    return case, _out_and_grads(ref, q, k, v, ct)


def _assert_matches_reference(fn, window, d=D, query_block=BLOCK, shared=False):
    (q, k, v, idx, mask, ct), want = _reference(window, d, query_block, shared)
    seen = visible_keys(idx, mask, SEQ, BLOCK, window, query_block).any(-1)
    if query_block < BLOCK:  # the two groups of a key block list different blocks
        assert np.any(np.asarray(idx[:, :, 0:4:2] != idx[:, :, 1:4:2]))
    assert seen.any() and not seen.all()  # some queries read nothing: their rows must be zero
    got = _out_and_grads(functools.partial(fn, block_indices=idx, slot_mask=mask, window=window),
                         q, k, v, ct)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= _tol(d) * float(jnp.max(jnp.abs(b))), f"{name}: {err}"
    out, dq = got[0], got[1]
    blind = ~seen.transpose(0, 2, 1)[..., None]  # [batch, T, heads, 1]
    assert not jnp.any(jnp.where(blind, out, 0.0)) and not jnp.any(jnp.where(blind, dq, 0.0))


@pytest.mark.parametrize("window,d,step,query_block", [(None, 16, 2, BLOCK),
                                                       (12, 128, None, QUERY_BLOCK)])
def test_gathered_blocks_equal_masked_reference(window, d, step, query_block):
    """step 2: query blocks in two lax.map steps (3 padded to 4); None: one step. Window 12 <
    B: blocks two back are wholly hidden, the previous one is partly visible. Query groups of
    16 in blocks of 32: each group has its own list (a path that read one list per key block,
    or took group i for block i, reads other keys)."""
    fn = lambda q, k, v, **kw: blocks.attention(q, k, v, block_size=BLOCK, scale=d ** -0.5,
                                                query_blocks_per_step=step,
                                                query_block=query_block, **kw)
    _assert_matches_reference(fn, window, d, query_block)


@pytest.mark.parametrize("window,d,tile,query_block,shared", [
    (None, 16, 16, BLOCK, False), (12, 128, 32, QUERY_BLOCK, False),
    (12, 16, 16, QUERY_BLOCK, True)])
def test_gpu_kernel_in_interpret_mode_equals_masked_reference(window, d, tile, query_block,
                                                              shared):
    """Tiles of 16 rows in blocks of 32: the kernels skip the tiles of a listed block that no
    query of a tile can see (the future; with the window, the far past). d = 128: the dk / dv
    kernel walks query steps of half a tile (`dkdv_query_tile`). Query groups of 16 with key
    tiles of 32: query and key tiles differ in size, and the dk / dv kernel's inverse lists
    map a key block to the groups (not blocks) that list it. Shared lists: the 2 heads of a GQA
    group are rows of one 16-row tile (8 tokens x 2 heads), each with its own slot mask."""
    assert pallas_gpu.dkdv_query_tile(tile, d) == (16 if d == 128 else tile)
    assert pallas_gpu.packed_rows(HEADS, KV_HEADS, tile, tile, d) == 2
    fn = lambda q, k, v, **kw: pallas_gpu.attention(q, k, v, block_size=BLOCK, tile=tile,
                                                    scale=d ** -0.5, interpret=True,
                                                    query_block=query_block,
                                                    shared_group_lists=shared, **kw)
    _assert_matches_reference(fn, window, d, query_block, shared)


def test_kernel_runs_per_device_over_batch_and_heads():
    """With a mesh and `spec`, a kernel runs in `shard_map` (batch over data, heads over tensor):
    each device's share equals the whole reference; GSPMD never sees the Pallas call."""
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    spec = PartitionSpec("data", None, "tensor", None)
    fn = functools.partial(block_sparse_attention, block_size=BLOCK, impl="pallas", spec=spec)
    with jax.set_mesh(mesh):
        (q, k, v, idx, _, _), _ = _reference(None, D)
        text = str(jax.make_jaxpr(functools.partial(fn, block_indices=idx))(q, k, v))
        assert "shard_map" in text
        _assert_matches_reference(fn, None)


@pytest.mark.parametrize("query_block", [BLOCK, QUERY_BLOCK])
def test_dk_dv_lists_invert_the_block_lists(query_block):
    """Every slot that reads a key block appears once under that block, in (head, query group,
    slot) order; unused, future and out-of-window slots not at all. Groups of 16 in blocks of
    32: group i starts at token 16 i, so it may read key block j only if 32 j <= 16 i + 15."""
    idx = np.asarray(_case(2, query_block=query_block)[3])
    lists = jax.jit(gpu_layout.key_block_lists, static_argnums=(1, 2, 3, 4, 5),
                    compiler_options=FAST_CPU_COMPILE)
    n = -(-SEQ // BLOCK)
    offsets, entries = map(np.asarray, lists(idx, KV_HEADS, BLOCK, None, query_block, n))
    batch, heads, groups, slots = idx.shape
    group = heads // KV_HEADS
    causal = BLOCK * np.arange(n) <= query_block * np.arange(groups)[:, None] + query_block - 1
    for b, g, j in np.ndindex(batch, KV_HEADS, n):
        c = (b * KV_HEADS + g) * n + j
        got = entries[offsets[c]:offsets[c + 1]].tolist()
        want = [(hl * groups + i) * slots + s for hl, i, s in np.ndindex(group, groups, slots)
                if idx[b, g * group + hl, i, s] == j and causal[i, j]]
        assert got == want
    reads = (idx >= 0) & causal[np.arange(groups)[:, None], np.maximum(idx, 0)]
    assert offsets[-1] == np.sum(reads)


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _largest_array(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` (sub-jaxprs included) makes."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for value in eqn.params.values():
            sizes += [_largest_array(sub) for sub in _sub_jaxprs(value)]
    return max(sizes)


def test_gathered_gradient_memory_grows_with_listed_blocks_not_t_squared():
    """At T = 1024, B = 16, L = 2 no array of the gradient's jaxpr reaches T^2 / 4 elements
    (scores are T * L * B = T^2 / 32 per head); the dense reference's does (the check sees)."""
    t, bs, slots = 1024, 16, 2
    q = jnp.zeros((1, t, 2, 16))
    idx = jnp.broadcast_to(jnp.stack([jnp.arange(t // bs), jnp.arange(t // bs) - 1], -1),
                           (1, 2, t // bs, slots)).astype(jnp.int32)
    mask = jnp.ones((1, 2, t, slots), bool)

    def largest(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, idx, mask, block_size=bs))
        return _largest_array(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr)

    assert largest(functools.partial(blocks.attention, window=None, scale=0.25)) < t * t // 4
    assert largest(masked_attention) >= t * t


def test_unsupported_kernel_shapes_fall_back_with_a_notice():
    """d = 8 or query groups of 8 are below Triton's dot: the interpreted "kernel" is the XLA
    path, said once; at d = 16 the op runs the kernel (and the TPU kernel, in interpret mode,
    the groups of 8)."""
    q, k, v, idx, mask, _ = _case(3, batch=1)
    trace = lambda impl, d: str(jax.make_jaxpr(functools.partial(
        block_sparse_attention, block_size=BLOCK, impl=impl))(q[..., :d], k[..., :d],
                                                               v[..., :d], idx, mask))
    assert "pallas_call" in trace("pallas_interpret", 16)
    with pytest.warns(UserWarning, match=r"powers of two >= 16 \(got 32, 32, 8\); using the"):
        fallback = trace("pallas_interpret", 8)
    assert fallback == trace("reference", 8) and "pallas_call" not in fallback
    # query groups of 8 rows are below Triton's dot too: the XLA path, said once
    q, k, v, idx, mask, _ = _case(3, batch=1, query_block=8)
    grouped = lambda impl, backend="gpu": str(jax.make_jaxpr(functools.partial(
        block_sparse_attention, block_size=BLOCK, query_block=8, impl=impl,
        interpret_backend=backend))(q, k, v, idx, mask))
    with pytest.warns(UserWarning, match=r"\(got 32, 8, 16\); using the XLA path"):
        fallback = grouped("pallas_interpret")
    assert fallback == grouped("reference") and "pallas_call" not in fallback
    assert "pallas_call" in grouped("pallas_interpret", "tpu")  # interpret mode takes any group


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((1, 40, 4))), r"q \(1, 40, 4\) must be \[batch, T, heads, d\]"),
    (dict(k=jnp.zeros((1, 40, 3, 16)), v=jnp.zeros((1, 40, 3, 16))),
     "heads=4 must be a multiple of kv_heads=3"),
    (dict(k=jnp.zeros((1, 32, 2, 16)), v=jnp.zeros((1, 32, 2, 16))), "must share batch, T"),
    (dict(q=jnp.zeros((1, 40, 4, 16), jnp.bfloat16)), "must share one floating dtype"),
    (dict(block_size=0), r"block_size=0 must be an int >= 1"),
    (dict(window=0), r"window=0: a window holds at least the query itself"),
    (dict(block_indices=jnp.zeros((1, 4, 2, 3), jnp.int32)),
     r"\[batch, heads, ceil\(T / query_block\), L\] = \[1, 4, 3, L >= 1\]"),
    (dict(query_block=8), r"\[batch, heads, ceil\(T / query_block\), L\] = \[1, 4, 5, L"),
    (dict(query_block=12), r"query_block=12 must be an int >= 1 dividing block_size=16"),
    (dict(block_indices=jnp.zeros((1, 4, 3, 3))), "block_indices must be integers"),
    (dict(slot_mask=jnp.ones((1, 4, 40, 2), bool)), r"slot_mask .* must be bool"),
    (dict(slot_mask=jnp.ones((1, 4, 40, 3))), r"slot_mask .* float32 must be bool"),
    (dict(impl="triton"), "impl='triton' is not one of"),
])
def test_bad_inputs_are_named(change, match):
    args = dict(q=jnp.zeros((1, 40, 4, 16)), k=jnp.zeros((1, 40, 2, 16)),
                v=jnp.zeros((1, 40, 2, 16)), block_indices=jnp.zeros((1, 4, 3, 3), jnp.int32),
                slot_mask=None, block_size=16)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**args)
