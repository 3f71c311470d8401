"""embedding_bag: kernels (interpret mode) against the jnp reference and its autodiff; lowering
for cuda and tpu from this CPU host; dispatch."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.embedding_bag import embedding_bag, reference

N, D, T, K = 48, 256, 10, 12
# bf16 tables: the kernels and the reference both accumulate in fp32 and round once to bf16,
# so they agree to one bf16 ulp of the output (|out| < ~20 here): atol 0.125, rtol 2**-7.
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=0.125, rtol=2**-7)}


def _inputs(dtype, duplicated=False, seed=0):
    kt, ki, kw, kg = jax.random.split(jax.random.key(seed), 4)
    table = jax.random.normal(kt, (N, D), jnp.float32).astype(dtype)
    if duplicated:  # every pick comes from 3 rows: long segments in d_table
        idx = jnp.array([5, 17, 40])[jax.random.randint(ki, (T, K), 0, 3)]
    else:
        idx = jax.random.randint(ki, (T, K), 0, N)
    w = jax.random.normal(kw, (T, K), jnp.float32)
    g = jax.random.normal(kg, (T, D), jnp.float32).astype(dtype)
    return table, idx.astype(jnp.int32), w, g


def _value_and_grads(fn, table, idx, w, g):
    def loss(t, w):
        out = fn(t, idx, w)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

    (_, out), (dt, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(table, w)
    return out, dt, dw


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_reference_matches_loop():
    table, idx, w, _ = _inputs(jnp.float32)
    out = reference(table, idx, w)
    t, i, ww = np.asarray(table), np.asarray(idx), np.asarray(w)
    expect = np.stack([sum(ww[r, k] * t[i[r, k]] for k in range(K)) for r in range(T)])
    _close(out, expect, atol=1e-5, rtol=1e-5)
    assert out.dtype == jnp.float32
    assert reference(table.astype(jnp.bfloat16), idx, w).dtype == jnp.bfloat16


@pytest.mark.parametrize("duplicated", [False, True], ids=["random", "dup3rows"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_matches_reference_and_autodiff(backend, dtype, duplicated):
    table, idx, w, g = _inputs(dtype, duplicated)
    out_r, dt_r, dw_r = _value_and_grads(reference, table, idx, w, g)

    def kernel(t, i, w):
        return embedding_bag(t, i, w, impl="pallas_interpret", interpret_backend=backend)

    out, dt, dw = _value_and_grads(kernel, table, idx, w, g)
    assert out.dtype == dtype and dt.dtype == dtype and dw.dtype == w.dtype
    tol = TOL[dtype]
    _close(out, out_r, **tol)
    _close(dw, dw_r, atol=1e-4 if dtype == jnp.float32 else 1e-2, rtol=tol["rtol"])
    # d_table sums up to T*K terms of w * g (|.| ~ a few tens for the 3-row case)
    _close(dt, dt_r, atol=1e-4 if dtype == jnp.float32 else 0.25, rtol=tol["rtol"])
    if duplicated:  # deterministic: a second run is bitwise equal
        _, dt2, dw2 = _value_and_grads(kernel, table, idx, w, g)
        assert np.array_equal(np.asarray(dt2, np.float32), np.asarray(dt, np.float32))
        assert np.array_equal(np.asarray(dw2), np.asarray(dw))


@pytest.mark.parametrize("duplicated", [False, True], ids=["random", "dup3rows"])
def test_reference_impl_backward_matches_autodiff(duplicated):
    table, idx, w, g = _inputs(jnp.float32, duplicated)
    _, dt_r, dw_r = _value_and_grads(reference, table, idx, w, g)
    _, dt, dw = _value_and_grads(
        lambda t, i, w: embedding_bag(t, i, w, impl="reference"), table, idx, w, g)
    _close(dt, dt_r, atol=1e-4, rtol=1e-5)
    _close(dw, dw_r, atol=1e-4, rtol=1e-5)


def test_leading_dims_are_flattened():
    table, idx, w, _ = _inputs(jnp.float32)
    idx4, w4 = idx.reshape(2, 5, 3, 4), w.reshape(2, 5, 3, 4)
    out = embedding_bag(table, idx4, w4, impl="pallas_interpret")
    assert out.shape == (2, 5, 3, D)
    _close(out, reference(table, idx4, w4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_export_lowers_kernels(platform):
    """Forward and forward+backward lower to Triton / Mosaic custom calls on a CPU host, for a
    named chip of the platform."""
    table, idx, w, _ = _inputs(jnp.bfloat16)
    name = {"cuda": dispatch.GPU_TRITON_CUSTOM_CALL, "tpu": dispatch.TPU_CUSTOM_CALL}[platform]

    def fwd(t, i, w):
        return embedding_bag(t, i, w, impl="pallas")

    def fwd_bwd(t, i, w):
        return jax.grad(lambda t, w: jnp.sum(fwd(t, i, w).astype(jnp.float32) ** 2),
                        (0, 1))(t, w)

    with dispatch.lowering_for(platform):  # `auto`: the XLA path until measured there
        auto = jax.export.export(jax.jit(lambda t, i, w: embedding_bag(t, i, w)),
                                 platforms=[platform],
                                 disabled_checks=dispatch.export_disabled_checks())(table, idx, w)
    assert f"@{name}(" not in auto.mlir_module()
    for fn, calls in [(fwd, 1), (fwd_bwd, 3)]:  # fwd; fwd + d_weights + d_table
        with dispatch.lowering_for(platform):  # H100 / TPU v5p: this host has neither
            exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                         disabled_checks=dispatch.export_disabled_checks())(
                                             table, idx, w)
        text = exported.mlir_module()
        assert text.count(f"@{name}(") == calls, (fn.__name__, text.count(f"@{name}("))


def test_auto_runs_reference_on_cpu():
    table, idx, w, g = _inputs(jnp.float32)
    lowered = jax.jit(lambda t, i, w: embedding_bag(t, i, w)).lower(table, idx, w).as_text()
    assert "custom_call" not in lowered  # neither the Triton nor the Mosaic kernel
    out, dt, dw = _value_and_grads(embedding_bag, table, idx, w, g)
    out_r, dt_r, dw_r = _value_and_grads(
        lambda t, i, w: embedding_bag(t, i, w, impl="reference"), table, idx, w, g)
    assert np.array_equal(out, out_r) and np.array_equal(dt, dt_r) and np.array_equal(dw, dw_r)
    # A shape interpret mode could never finish quickly: 4096 tokens x 128 picks, 2^16 rows.
    big_t = jax.random.normal(jax.random.key(1), (1 << 16, 128), jnp.float32)
    big_i = jax.random.randint(jax.random.key(2), (4096, 128), 0, 1 << 16)
    big_w = jnp.ones((4096, 128), jnp.float32)
    start = time.perf_counter()
    jax.jit(embedding_bag)(big_t, big_i, big_w).block_until_ready()
    assert time.perf_counter() - start < 30


def test_bad_arguments_are_named():
    table, idx, w, _ = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="impl='triton'"):
        embedding_bag(table, idx, w, impl="triton")
    with pytest.raises(ValueError, match="same shape"):
        embedding_bag(table, idx, w[:, :3])
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        embedding_bag(table[None], idx, w)


def test_lowering_for_names_the_chip_and_keeps_the_mesh():
    """`lowering_for` puts the chip in the abstract mesh (Pallas reads its kernel target there),
    keeps the axes of the mesh in context, and restores that mesh on exit."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        before = jax.sharding.get_abstract_mesh()
        with dispatch.lowering_for("tpu") as chip:
            inside = jax.sharding.get_abstract_mesh()
            assert chip == dispatch.TPU_V5P
            assert (inside.axis_names, inside.axis_sizes) == (("data", "fsdp"), (2, 4))
            device = inside.abstract_device
            assert (device.device_kind, device.num_cores, device.platform) == ("TPU v5p", 2, "tpu")
        assert jax.sharding.get_abstract_mesh() == before
        # A sharded export for CUDA: the Triton kernel lowers with the mesh's devices.
        table, idx, w, _ = _inputs(jnp.bfloat16)
        idx, w = (jax.device_put(a, jax.NamedSharding(mesh, jax.P("data"))) for a in (idx, w))
        with dispatch.lowering_for(dispatch.H100):
            exported = jax.export.export(jax.jit(functools.partial(embedding_bag,
                                                                   impl="pallas")),
                                         platforms=["cuda"],
                                         disabled_checks=dispatch.export_disabled_checks())(
                                             table, idx, w)
        assert exported.nr_devices == 8
        assert exported.mlir_module().count(f"@{dispatch.GPU_TRITON_CUSTOM_CALL}(") == 1
    with pytest.raises(ValueError, match=r"lowering_for\('rocm'\)"), dispatch.lowering_for("rocm"):
        pass


# Production blocking in interpret mode: K = 32 picks, value dims of 3 x 128 and 4 x 512 column
# blocks, T not a multiple of the 8-token block, T*K spanning several 128-triple d_table steps,
# odd row counts (the bf16 word view pads a row), few rows (long d_table segments).
# (fp32 tables take the same kernels' single-row copies, checked at small shapes above.)
PROD_BLOCKING = [(37, 384, 21, jnp.bfloat16), (64, 2048, 12, jnp.bfloat16)]


def _bound(exact, terms_abs_sum, n_terms, dtype):
    """Error bound of an fp32-accumulated sum of `n_terms` products, rounded once to `dtype`.

    Recursive fp32 summation of n fp32-rounded products errs by at most
    delta = (n + 1) * 2^-24 * sum|terms| (Higham, gamma_n); the final rounding to `dtype` adds
    half an ulp of the result, at most u * (|exact| + delta) with u = 2^-8 (bf16) or 2^-24.
    Summing in bf16 instead errs by ~2^-8 per addition (checked to fail this bound below)."""
    u = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-24
    delta = (n_terms + 1) * 2.0**-24 * terms_abs_sum
    return u * (np.abs(exact) + delta) + delta + 1e-30


@pytest.mark.parametrize("n,d,t,dtype", PROD_BLOCKING,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_tpu_kernels_match_exact_sums_at_production_blocking(n, d, t, dtype):
    k = 32
    kt, ki, kw, kg = jax.random.split(jax.random.key(3), 4)
    table = jax.random.normal(kt, (n, d), jnp.float32).astype(dtype)
    idx = jax.random.randint(ki, (t, k), 0, n).astype(jnp.int32)
    w = jax.random.normal(kw, (t, k), jnp.float32)
    g = jax.random.normal(kg, (t, d), jnp.float32).astype(dtype)

    def kernel(tb, i, ww):
        return embedding_bag(tb, i, ww, impl="pallas_interpret", interpret_backend="tpu")

    out, dt, dw = _value_and_grads(kernel, table, idx, w, g)
    # Exact sums in float64 from the same (bf16-representable) inputs.
    t64, w64, g64 = (np.asarray(a, np.float64) for a in (table, w, g))
    i = np.asarray(idx)
    terms = w64[:, :, None] * t64[i]  # [T, K, d]
    out_x, out_s = terms.sum(1), np.abs(terms).sum(1)
    dw_terms = g64[:, None, :] * t64[i]  # [T, K, d]
    dw_x, dw_s = dw_terms.sum(2), np.abs(dw_terms).sum(2)
    dt_x, dt_s = np.zeros((n, d)), np.zeros((n, d))
    np.add.at(dt_x, i.reshape(-1), (w64[:, :, None] * g64[:, None, :]).reshape(-1, d))
    np.add.at(dt_s, i.reshape(-1), np.abs(w64[:, :, None] * g64[:, None, :]).reshape(-1, d))
    uses = np.bincount(i.reshape(-1), minlength=n)[:, None]
    checks = [("out", out, out_x, _bound(out_x, out_s, k, dtype)),
              ("d_weights", dw, dw_x, _bound(dw_x, dw_s, d, jnp.float32)),
              ("d_table", dt, dt_x, _bound(dt_x, dt_s, uses.max(), dtype))]
    for name, got, exact, bound in checks:
        err = np.abs(np.asarray(got, np.float64) - exact)
        assert (err <= bound).all(), (name, float((err / bound).max()))
    if dtype == jnp.bfloat16:  # the bound rejects a kernel that sums in bf16
        acc = np.zeros((t, d), np.float32)
        for j in range(k):
            acc = np.asarray(jnp.asarray(acc + terms[:, j], jnp.float32).astype(jnp.bfloat16),
                             np.float32)
        assert (np.abs(acc - out_x) > _bound(out_x, out_s, k, dtype)).any()


def test_gpu_kernels_refuse_tables_whose_offsets_overflow_int32():
    # Triton's element offsets are int32: the production 2^20 x 2048 table (last offset
    # 2^31 - 1) is the largest it takes; one more row would wrap around to negative offsets.
    from mnemax.layers.kernels.embedding_bag import pallas_gpu

    assert pallas_gpu.supported(2048, 2**20, 16384)
    assert not pallas_gpu.supported(2048, 2**20 + 1, 16384)
    assert not pallas_gpu.supported(2048, 1024, 2**20 + 1)
