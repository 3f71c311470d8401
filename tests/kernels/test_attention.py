"""Causal attention op: splash attention (interpret mode) against an independent fp32 reference,
forward and gradients, causal and sliding window, GQA, inside `shard_map` over batch and heads;
the XLA fallback for sequences splash cannot take; and the train step of `tiny` compiled for a
TPU topology (tensor and sequence parallel) carrying the splash kernel, which a CPU lowering
does not.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from mnemax.layers.kernels.attention import causal_attention
from mnemax.layers.kernels.dispatch import TPU_CUSTOM_CALL
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.memory_report import lower_train_step
from mnemax.trainer.setup import build_program

# 3 blocks of 128 along q and kv; 4 q heads over 2 kv heads (a wrong grouping, `n % kv_heads`
# instead of `n // 2`, sends heads 1 and 2 to the other kv head).
BATCH, SEQ, HEADS, KV_HEADS, DIM, BLOCK = 2, 384, 4, 2, 64, 128


def _attention_fp32(q, k, v, window):
    """`softmax(q k^T / sqrt(d) + mask) v` written out: kv heads repeated to the q heads, the
    mask from positions; shares no code with either path under test."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(q.shape[-1])
    i, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    visible = (j <= i) if window is None else (j <= i) & (j > i - window)
    scores = jnp.where(visible, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision="highest")


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (BATCH, SEQ, HEADS, DIM), jnp.float32)
    k = jax.random.normal(keys[1], (BATCH, SEQ, KV_HEADS, DIM), jnp.float32)
    v = jax.random.normal(keys[2], (BATCH, SEQ, KV_HEADS, DIM), jnp.float32)
    d_out = jax.random.normal(keys[3], (BATCH, SEQ, HEADS, DIM), jnp.float32)
    return q, k, v, d_out


def _value_and_grads(attention, q, k, v, d_out):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(d_out))


# Window 100 with 128-blocks: the last q block (256..383) sees keys from 157 on, so kv block 0
# is skipped entirely and blocks 1-2 are partial (the kernel's block-sparse path).
@pytest.mark.parametrize("window", [None, 100], ids=["causal", "window100"])
def test_splash_matches_reference_sharded(window):
    """Splash (interpret mode) in `shard_map` over batch (data: 2) and heads (tensor: 2).

    Tolerance: fp32 (unit roundoff u = 6e-8). Each output is a softmax-weighted mean of at most
    n = 384 values with d = 64-term logits; the blocked online softmax reorders the sums, so
    both results sit within about (n + d) u ~ 3e-5 of the exact one, relative to the largest
    magnitude involved (max |v| ~ 4.5 here, gradients of similar size). 1e-4 of the reference's
    largest entry covers this with 3x margin; a missing 1/sqrt(d), an off-by-one window edge or a
    wrong head grouping moves entries by 1e-2 or more.
    """
    q, k, v, d_out = _inputs()
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    spec = PartitionSpec("data", None, "tensor", None)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: _value_and_grads(
            lambda q, k, v: causal_attention(q, k, v, window=window, impl="splash", spec=spec,
                                             block=BLOCK), *a))(q, k, v, d_out)
    want = _value_and_grads(lambda q, k, v: _attention_fp32(q, k, v, window), q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape, name
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= 1e-4 * scale, f"{name}: max error {err:.2e} vs scale {scale:.2e}"


def test_xla_paths_match_reference_and_odd_length_falls_back():
    """"xla" and a sequence that is not a multiple of 128 under "splash" (the XLA path, with a
    one-line notice) both match the reference, windowed. Same tolerance as above."""
    q, k, v, _ = (x[:, :200] for x in _inputs())
    want = _attention_fp32(q, k, v, 50)
    assert float(jnp.max(jnp.abs(causal_attention(q, k, v, window=50, impl="xla") - want))) \
        <= 1e-4 * float(jnp.max(jnp.abs(want)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = causal_attention(q, k, v, window=50, impl="splash")
    assert [str(w.message) for w in caught] == [
        "splash attention unavailable (sequence length 200 is not a multiple of 128); "
        "using the XLA path."]
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("window", [None, 100, 600])
def test_xla_path_over_query_blocks_matches_reference(window):
    """The XLA path splits queries longer than `QUERY_BLOCK` into blocks, each against the keys it
    can see: 1100 tokens = blocks of 512, 512 and a ragged 76; window 100 starts every block's
    keys inside the previous block, window 600 two blocks back for the last block.

    Tolerance: as above with n = 1100 keys: (n + d) u ~ 7e-5 of the largest magnitude; 2e-4
    keeps a 3x margin, while a block that drops a visible key or keeps a masked one moves its
    rows by far more (a whole softmax weight)."""
    from mnemax.layers.kernels.attention.reference import QUERY_BLOCK, xla_attention

    seq = 1100
    assert seq > 2 * QUERY_BLOCK
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (1, seq, 4, 16), jnp.float32)
    k, v = (jax.random.normal(kk, (1, seq, 2, 16), jnp.float32) for kk in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    got = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: xla_attention(q, k, v, window=window), *a))(q, k, v, d_out)
    want = _value_and_grads(lambda q, k, v: _attention_fp32(q, k, v, window), q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= 2e-4 * scale, f"{name}: max error {err:.2e} vs scale {scale:.2e}"


def test_bad_shapes_are_named():
    q = jnp.zeros((1, 128, 3, 64))
    kv = jnp.zeros((1, 128, 2, 64))
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        causal_attention(q, kv, kv)
    with pytest.raises(ValueError, match="window >= 1"):
        causal_attention(kv, kv, kv, window=0)


# tiny at 256 tokens (one 256-token splash block), tensor and sequence parallel on 4 chips.
TINY_TP_SP = ["data.seq_len=256", "data.global_batch=4", "model.num_layers=2",
              "strategy.mesh=data:2,tensor:2", "strategy.sequence_parallel=true",
              "run.compute_dtype=bfloat16"]


def test_train_step_carries_splash_on_tpu_only():
    """`auto` attention: the train step compiled for v5p:2x2x1 (real Mosaic compile, no TPU
    needed) runs splash kernels (forward, dq, dk/dv: three per layer's attention in the
    compiled program's text), with no fallback notice (model.init's one-sequence batch is not
    split, not refused); the same step lowered for CPU has none."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except Exception as err:  # no libtpu: the dev install brings it (jax[tpu])
        pytest.fail(f"libtpu's compile-only topology is unavailable ({err}); "
                    "pip install -e '.[dev]' installs jax[tpu]")
    recipe = load_recipe("tiny", TINY_TP_SP)
    cpu_text = lower_train_step(build_program(recipe, jax.devices()[:4])).as_text()
    assert TPU_CUSTOM_CALL not in cpu_text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lower_train_step(build_program(recipe, tpu)).compile().as_text()
    assert not [w for w in caught if "splash" in str(w.message)]
    assert compiled.count(TPU_CUSTOM_CALL) >= 3, "forward, dq and dkv splash kernels expected"
