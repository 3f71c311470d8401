"""The gated delta rule op: chunk form against the recurrent reference, gradients, decoding,
dtypes, causality and extreme decays."""

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.layers.kernels import dispatch, gated_delta
from mnemax.layers.kernels.gated_delta import (
    CONFIG_IMPLS,
    chunk_gated_delta_rule,
    gated_delta_rule,
    gated_delta_step,
    impl_and_form,
    pallas_gpu,
)
from mnemax.layers.kernels.gated_delta.chunk import (
    _chunk_intra,
    _inter_scan_kernel_layout,
    _unit_lower_inverse,
)

B, H, DK, DV = 2, 2, 16, 32
CHUNK = 64
# The tests are bound by XLA:CPU compile time; LLVM's optimisation passes are most of it and buy
# nothing at these sizes (about 4x less compile time without them).
jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                               "xla_llvm_disable_expensive_passes": True})


def make_inputs(time, seed=0, dtype=jnp.float32, g_scale=2.0):
    """Inputs as the layer makes them: unit-norm q and k, g = -softplus(.), beta = sigmoid(.)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, time, H, DK)))
    k = unit(jax.random.normal(ks[1], (B, time, H, DK)))
    v = jax.random.normal(ks[2], (B, time, H, DV))
    g = -jax.nn.softplus(g_scale * jax.random.normal(ks[3], (B, time, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, time, H)))
    s0 = jax.random.normal(ks[5], (B, H, DK, DV))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)), s0


# The ways to run the op that the tests compare: the two XLA forms and the kernel.
METHODS = {"recurrent": dict(impl="reference", form="recurrent"),
           "chunk": dict(impl="reference", form="chunk"),
           "pallas": dict(impl="pallas", form="chunk"),
           "pallas_interpret": dict(impl="pallas_interpret", form="chunk")}


@functools.partial(jit, static_argnames=("method",))
def run(q, k, v, g, beta, s0, method):
    return gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                            chunk_size=CHUNK, **METHODS[method])


def close(a, b, atol=1e-4, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=atol, rtol=rtol)


def test_reference_matches_the_papers_form():
    """The reference equals a direct loop over S_t = S alpha (I - beta k k^T) + beta v k^T with
    S: [d_v, d_k] and o = S q * scale; fla's state is the transpose."""
    (q, k, v, g, beta), s0 = make_inputs(63, seed=63)
    o, s = run(q, k, v, g, beta, s0, "recurrent")
    q, k, v, g, beta, s0 = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, s0))
    o_loop, s_loop = np.zeros(o.shape), np.zeros(s.shape)
    for b in range(B):
        for h in range(H):
            S = s0[b, h].T  # [d_v, d_k]
            for t in range(q.shape[1]):
                kt, bt = k[b, t, h], beta[b, t, h]
                S = S * np.exp(g[b, t, h]) @ (np.eye(DK) - bt * np.outer(kt, kt))
                S = S + bt * np.outer(v[b, t, h], kt)
                o_loop[b, t, h] = S @ q[b, t, h] * DK**-0.5
            s_loop[b, h] = S.T
    close(o, o_loop, atol=1e-5)
    close(s, s_loop, atol=1e-5)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("time", [1, 63, 64, 65, 300])
def test_chunk_matches_recurrent(time, with_state):
    (q, k, v, g, beta), s0 = make_inputs(time, seed=time)
    s0 = s0 if with_state else None
    o_ref, s_ref = run(q, k, v, g, beta, s0, "recurrent")
    o, s = run(q, k, v, g, beta, s0, "chunk")
    assert o.shape == (B, time, H, DV) and o.dtype == jnp.float32
    assert s.shape == (B, H, DK, DV) and s.dtype == jnp.float32
    close(o, o_ref)
    close(s, s_ref)


@pytest.mark.optimized_xla  # the recurrent reference runs step by step
def test_gradients_match_recurrent():
    time = 130  # two full chunks and a padded third
    (q, k, v, g, beta), s0 = make_inputs(time, seed=1)
    ko, ks = jax.random.split(jax.random.key(7))
    w_o = jax.random.normal(ko, (B, time, H, DV))
    w_s = jax.random.normal(ks, (B, H, DK, DV))

    def loss(method, *args):
        o, s = gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                                chunk_size=CHUNK, **METHODS[method])
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    args = (q, k, v, g, beta, s0)
    grad = lambda method: jit(jax.grad(functools.partial(loss, method), argnums=range(6)))
    for name, a, b in zip(["q", "k", "v", "g", "beta", "s0"], grad("chunk")(*args),
                          grad("recurrent")(*args), strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3, err_msg=name)


def test_step_by_step_decoding_matches_parallel():
    time = 65
    (q, k, v, g, beta), s0 = make_inputs(time, seed=3)
    o_par, s_par = run(q, k, v, g, beta, s0, "chunk")
    step = jit(gated_delta_step)
    state, outs = s0, []
    for t in range(time):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
    close(jnp.stack(outs, axis=1), o_par)
    close(state, s_par)


@pytest.mark.optimized_xla  # the recurrent reference runs step by step
def test_bf16_inputs_accumulate_in_fp32():
    """bf16 in, bf16 out, fp32 state. Against fp32 math on the same (bf16-rounded) inputs the only
    error is the final rounding of o to bf16 (relative 2^-8): atol = rtol = 1e-2. The state never
    leaves fp32, so it matches to 1e-4."""
    (q, k, v, g, beta), s0 = make_inputs(130, seed=4, dtype=jnp.bfloat16)
    o, s = run(q, k, v, g, beta, s0, "chunk")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = run(*up, s0, "recurrent")
    close(o, o_ref, atol=1e-2, rtol=1e-2)
    close(s, s_ref, atol=1e-4, rtol=1e-4)
    # And the recurrent form with bf16 inputs agrees with the chunk form the same way.
    o_rec, _ = run(q, k, v, g, beta, s0, "recurrent")
    assert o_rec.dtype == jnp.bfloat16
    close(o, o_rec, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["chunk", "recurrent"])
def test_causal(method):
    time, cut = 300, 100  # the cut falls inside the second chunk
    (q, k, v, g, beta), s0 = make_inputs(time, seed=5)
    o, _ = run(q, k, v, g, beta, s0, method)
    later = lambda x, y: x.at[:, cut + 1:].set(y[:, cut + 1:])
    (q2, k2, v2, g2, beta2), _ = make_inputs(time, seed=6)
    o2, _ = run(later(q, q2), later(k, k2), later(v, 100 * v2), later(g, g2 - 20.0),
                later(beta, beta2), s0, method)
    close(o2[:, :cut + 1], o[:, :cut + 1], atol=1e-6, rtol=1e-6)
    assert not np.allclose(o2[:, cut + 1:], o[:, cut + 1:])


def test_extreme_decays_stay_finite():
    """g = -softplus(.) style, with runs of tokens at g ~ 0 and at g = -20 and -100, so that the
    cumulative log-decay inside a chunk reaches -6400: forward and gradient stay finite and equal
    the recurrent form."""
    time = 300
    (q, k, v, g, beta), s0 = make_inputs(time, seed=8, g_scale=4.0)
    g = g.at[:, 10:40].set(-1e-6).at[:, 60:130].set(-20.0).at[:, 140:150].set(-100.0)
    g = g.at[:, 150:].set(0.0)
    beta = beta.at[:, ::7].set(0.999)
    o, s = run(q, k, v, g, beta, s0, "chunk")
    o_ref, s_ref = run(q, k, v, g, beta, s0, "recurrent")
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
    close(o, o_ref)
    close(s, s_ref)

    def loss(g, beta, k):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                      output_final_state=True, chunk_size=CHUNK)
        return jnp.sum(o**2) + jnp.sum(s**2)

    grads = jit(jax.grad(loss, argnums=(0, 1, 2)))(g, beta, k)
    for name, grad in zip(("g", "beta", "k"), grads, strict=True):
        assert np.isfinite(np.asarray(grad)).all(), name


def test_chunk_backward_keeps_per_chunk_not_per_token_states():
    """Memory: the recurrent form's backward stores a [d_k, d_v] state per token; the chunk form
    only one per chunk (plus O(time * (chunk + d)) rows), so its compiled temp memory stays far
    below the per-token states. Compiled only, never run; d = 128 as in real models."""
    batch, time, heads, d = 1, 1024, 1, 128
    x = jnp.ones((batch, time, heads, d))
    gb = jnp.full((batch, time, heads), 0.5)

    def temp_bytes(method):
        f = lambda *a: jnp.sum(gated_delta_rule(*a, chunk_size=CHUNK, **METHODS[method])[0])
        compiled = jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, x, x, -gb, gb).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_token_states = batch * heads * time * d * d * 4
    assert temp_bytes("recurrent") >= per_token_states
    assert temp_bytes("chunk") < per_token_states / 4


def test_unit_lower_inverse():
    for chunk in (1, 5, 48, 64):
        a = jnp.tril(0.3 * jax.random.normal(jax.random.key(chunk), (3, chunk, chunk)), -1)
        expected = np.linalg.inv(np.eye(chunk) + np.asarray(a, np.float64))
        close(jit(_unit_lower_inverse)(a), expected, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    (q, k, v, g, beta), s0 = make_inputs(8)
    with pytest.raises(ValueError, match="powers of two"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=24, impl="pallas")
    with pytest.raises(ValueError, match="is not one of"):
        gated_delta_rule(q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="is not one of"):  # an algorithm, not a backend
        gated_delta_rule(q, k, v, g, beta, impl="chunk")
    with pytest.raises(ValueError, match="form='fused' is not one of"):
        gated_delta_rule(q, k, v, g, beta, form="fused")
    with pytest.raises(ValueError, match="recurrent form has no Pallas kernel"):
        gated_delta_rule(q, k, v, g, beta, impl="pallas_interpret", form="recurrent")
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(q, k, v, g, beta, initial_state=s0.swapaxes(-1, -2))
    with pytest.raises(ValueError, match="v must be"):
        gated_delta_rule(q, k, v[:, :4], g, beta)


def kernel_inputs(q, k, v, g, beta, chunk=CHUNK):
    """The Triton kernel's inputs `[b * h, n, C, .]`, fp32, as `chunk_gated_delta_rule` builds
    them (zero-padded in time, then `_chunk_intra`)."""
    batch, time, heads, d_k = q.shape
    pad = -time % chunk

    def to_chunks(x):  # [b, t, h, ...] -> [b * h, n, C, ...]
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.moveaxis(x.reshape(batch, -1, chunk, heads, *x.shape[3:]), 3, 1)
        return x.reshape(batch * heads, -1, chunk, *x.shape[4:])

    return _chunk_intra(*map(to_chunks, (q, k, v, g, beta)), d_k**-0.5)


def bf16_operand_error_bound(xs, s0):
    """Elementwise first-order bound on |kernel - exact| for the kernel's scan, whose matmul
    operands are rounded to bf16 and accumulated in fp32: `(o_bound, state_bound)` in the
    kernel's layout.

    A bf16 operand is `x (1 + t)`, `|t| <= 2^-8` (8 significant bits, round to nearest), so a
    product of two is off by at most `(2^-7 + 2^-16) |a| |b|`; fp32 accumulation of at most
    `C + d_k <= 192` terms adds `<= 192 * 2^-24 < 2^-16` of the same sums, and the fp32
    reference as much again: `eps = 2^-7 + 2^-14` covers all three. With the exact
    state `S`, the kernel's `S + E`, `|E| <= e`, and `|.|` products of absolute values:
        |U' - U| <= f = |W| e + eps |W| (|S| + e)
        |O' - O| <= |Qd| e + eps |Qd| (|S| + e) + |A| f + eps |A| (|U| + f)
        e_next   =  decay e + |Kd|^T f + eps |Kd|^T (|U| + f)
    """
    eps = 2.0**-7 + 2.0**-14
    mm = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)

    def step(carry, x):
        s, e = carry
        w, _, attn, qd, kd, decay = map(jnp.abs, x)  # |.| of the operands
        u = x[1] - mm("...ck,...kv->...cv", x[0], s)
        f = mm("...ck,...kv->...cv", w, e + eps * (jnp.abs(s) + e))
        o_bound = (mm("...ck,...kv->...cv", qd, e + eps * (jnp.abs(s) + e))
                   + mm("...cj,...jv->...cv", attn, f + eps * (jnp.abs(u) + f)))
        e = decay[..., None, None] * e + mm("...ck,...cv->...kv", kd, f + eps * (jnp.abs(u) + f))
        s = x[5][..., None, None] * s + mm("...ck,...cv->...kv", x[4], u)
        return (s, e), o_bound

    (_, e), o_bound = jax.lax.scan(step, (s0, jnp.zeros_like(s0)),
                                   [jnp.moveaxis(t, 1, 0) for t in xs])
    return jnp.moveaxis(o_bound, 0, 1), e


def test_pallas_kernel_interpret_matches_chunk():
    """The Triton kernel for the scan over chunks, in interpret mode: forward equal to the XLA
    chunk form within the bound its bf16 matmul operands allow (`bf16_operand_error_bound`);
    gradients (kernel forward, XLA backward of the fp32 scan) equal to the chunk form's."""
    time = 130
    (q, k, v, g, beta), s0 = make_inputs(time, seed=2)
    o, s = run(q, k, v, g, beta, s0, "chunk")
    o_p, s_p = run(q, k, v, g, beta, s0, "pallas_interpret")
    o_bound, s_bound = bf16_operand_error_bound(kernel_inputs(q, k, v, g, beta),
                                                s0.reshape(B * H, DK, DV))
    # [b * h, n, C, d_v] -> [b, t, h, d_v]
    o_bound = o_bound.reshape(B, H, -1, DV)[:, :, :time].swapaxes(1, 2)
    assert np.all(np.abs(o_p - o) <= o_bound + 1e-6)
    assert np.all(np.abs(s_p - s) <= s_bound.reshape(s.shape) + 1e-6)
    assert not np.array_equal(o_p, o)  # the kernel's operands are bf16: not the fp32 scan

    # Linear in the outputs, so the cotangents do not depend on the forward's (bf16) values and
    # both backwards run the same fp32 arithmetic on the same residuals.
    w_o, w_s = (jax.random.normal(key, x.shape) for key, x in
                zip(jax.random.split(jax.random.key(3)), (o, s), strict=True))

    def loss(method, *args):
        o, s = gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                                chunk_size=CHUNK, **METHODS[method])
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    args = (q, k, v, g, beta, s0)
    grads = [jit(jax.grad(functools.partial(loss, method), argnums=range(6)))(*args)
             for method in ("pallas", "chunk")]  # "pallas" off CUDA: the kernel interpreted
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("d_v", [8, 80])
def test_pallas_kernel_column_blocks(d_v):
    """The kernel at its blocking, in interpret mode, against the XLA scan: `d_v` narrower
    than a block (padded to 16), and three blocks of 32 columns with a ragged last one (16
    real columns); d_k = 32, three chunks, a random start state. Within the bf16-operand bound,
    and the bound is tight enough to see a wrong column: it stays below 5% of the largest
    output, whose columns are O(1) apart."""
    bh, time, d_k = 3, 3 * CHUNK, 32
    ks = jax.random.split(jax.random.key(d_v), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (unit(jax.random.normal(key, (1, time, bh, d_k))) for key in ks[:2])
    v = jax.random.normal(ks[2], (1, time, bh, d_v))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (1, time, bh)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, time, bh)))
    s0 = jax.random.normal(ks[5], (bh, d_k, d_v))
    xs = kernel_inputs(q, k, v, g, beta)
    assert pallas_gpu.block_v(d_v) == min(32, max(16, d_v))
    o, s = jit(_inter_scan_kernel_layout)(xs, s0)
    o_p, s_p = jit(functools.partial(pallas_gpu.inter_chunk_pallas, interpret=True))(*xs, s0)
    assert o_p.shape == o.shape == (bh, 3, CHUNK, d_v) and s_p.shape == s.shape
    o_bound, s_bound = bf16_operand_error_bound(xs, s0)
    assert np.all(np.abs(o_p - o) <= o_bound + 1e-6)
    assert np.all(np.abs(s_p - s) <= s_bound + 1e-6)
    assert np.max(o_bound) < 0.05 * np.max(np.abs(o))


# `auto` takes the kernel only on a platform where it was measured faster (none yet for this
# one: it has not run on a GPU), so exporting `auto` for CUDA must hold no Triton call.
@pytest.mark.parametrize(("impl", "calls"), [("pallas", 1), ("auto", 0)])
def test_pallas_kernel_lowers_for_cuda(impl, calls):
    """Forward and forward+backward export for CUDA (H100) from this CPU host: one Triton call
    each with `pallas` (the backward is XLA), none with `auto`."""
    assert impl == "pallas" or "cuda" not in gated_delta.AUTO_PLATFORMS
    (q, k, v, g, beta), _ = make_inputs(130, dtype=jnp.bfloat16)

    def fwd(*args):
        return gated_delta_rule(*args, impl=impl)[0]

    def fwd_bwd(*args):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2),
                        argnums=range(5))(*args)

    for fn in (fwd, fwd_bwd):
        with dispatch.lowering_for(dispatch.H100):
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                         disabled_checks=dispatch.export_disabled_checks())(
                                             q, k, v, g, beta)
        text = exported.mlir_module()
        assert text.count(f"@{dispatch.GPU_TRITON_CUSTOM_CALL}(") == calls, fn.__name__


def test_auto_is_the_xla_chunk_form_on_cpu():
    """`auto` (the default) lowers to no custom call and gives the XLA chunk form's bits."""
    (q, k, v, g, beta), s0 = make_inputs(65, seed=9)
    o, s = jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True,
                                           chunk_size=CHUNK))(q, k, v, g, beta, s0)
    o_ref, s_ref = run(q, k, v, g, beta, s0, "chunk")  # same compiler options: same bits
    np.testing.assert_array_equal(o, o_ref)
    np.testing.assert_array_equal(s, s_ref)
    text = jax.jit(lambda *a: gated_delta_rule(*a)[0]).lower(q, k, v, g, beta).as_text()
    assert "custom_call" not in text


def test_every_config_impl_maps_to_impl_and_form():
    """Each value `GatedDeltaConfig.impl` accepts names a backend of the shared vocabulary and a
    form; the names from before it keep their meaning (chunk and recurrent are XLA forms)."""
    hints = typing.get_type_hints(GatedDeltaConfig)
    accepted = typing.get_args(hints["impl"]) or tuple(CONFIG_IMPLS)  # Literal, or still `str`
    for name in accepted:
        impl, form = impl_and_form(name)
        assert impl in dispatch.IMPLS and form in ("chunk", "recurrent"), name
    assert impl_and_form("auto") == ("auto", "chunk")
    assert impl_and_form("chunk") == ("reference", "chunk")
    assert impl_and_form("recurrent") == impl_and_form("reference") == ("reference", "recurrent")
    with pytest.raises(ValueError, match="is not one of"):
        impl_and_form("triton")
