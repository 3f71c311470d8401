"""embedding_bag: kernels (interpret mode) against the jnp reference and its autodiff; lowering
for cuda and tpu from this CPU host; dispatch."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.embedding_bag import (
    embedding_bag,
    pallas_gpu,
    pallas_tpu,
    reference,
    row_dot,
    row_dot_reference,
)

N, D, T, K = 48, 256, 10, 12


def _inputs(dtype, seed=0):
    """Random picks, a third of them from 3 rows (long d_table segments), 1 in 8 weights 0
    (masked picks: the GPU d_table's sentinel)."""
    kt, ki, kw, kg = jax.random.split(jax.random.key(seed), 4)
    table = jax.random.normal(kt, (N, D), jnp.float32).astype(dtype)
    ki, kh, ks = jax.random.split(ki, 3)
    idx = jax.random.randint(ki, (T, K), 0, N)
    hot = jnp.array([5, 17, 40])[jax.random.randint(kh, (T, K), 0, 3)]
    idx = jnp.where(jax.random.uniform(ks, (T, K)) < 1 / 3, hot, idx)
    w = jax.random.normal(kw, (T, K), jnp.float32)
    w = jnp.where(jax.random.uniform(kw, (T, K)) < 1 / 8, 0.0, w)
    g = jax.random.normal(kg, (T, D), jnp.float32).astype(dtype)
    return table, idx.astype(jnp.int32), w, g


def _grad_fn(fn, g):
    """jit of `(table, idx, w) -> (out, d_table, d_weights)` for the loss `sum(out * g)`."""
    def value_and_grads(table, idx, w):
        def loss(t, w):
            out = fn(t, idx, w)
            return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

        (_, out), (dt, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(table, w)
        return out, dt, dw

    return jax.jit(value_and_grads)


def _value_and_grads(fn, table, idx, w, g):
    return _grad_fn(fn, g)(table, idx, w)


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


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_matches_reference_and_autodiff(backend):
    """fp32 tables (bf16: `test_kernels_match_exact_sums_at_production_blocking`)."""
    table, idx, w, g = _inputs(jnp.float32)
    out_r, dt_r, dw_r = _value_and_grads(reference, table, idx, w, g)

    def kernel(t, i, w):
        return embedding_bag(t, i, w, impl="pallas_interpret", interpret_backend=backend)

    fn = _grad_fn(kernel, g)
    out, dt, dw = fn(table, idx, w)
    assert out.dtype == dt.dtype == dw.dtype == jnp.float32
    # fp32 sums of at most T*K = 120 terms of |.| < ~10 in another order than the reference's:
    # each errs by at most ~120 * 2^-24 * sum|terms| ~ 1e-4 absolute (Higham's gamma_n).
    _close(out, out_r, atol=1e-5, rtol=1e-5)
    _close(dw, dw_r, atol=1e-4, rtol=1e-5)
    _close(dt, dt_r, atol=1e-4, rtol=1e-5)
    _, dt2, dw2 = fn(table, idx, w)  # deterministic: a second run is bitwise equal
    assert np.array_equal(np.asarray(dt2), np.asarray(dt))
    assert np.array_equal(np.asarray(dw2), np.asarray(dw))


def test_reference_impl_backward_matches_autodiff():
    table, idx, w, g = _inputs(jnp.float32)
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
    # fwd; fwd + d_weights + d_table (on GPU one call per level of its segmented reduction)
    levels = pallas_gpu.segment_levels(T * K) if platform == "cuda" else 1
    for fn, calls in [(fwd, 1), (fwd_bwd, 2 + levels)]:
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


# Production blocking in interpret mode, bf16 tables: value dims of several column blocks (TPU:
# 5 x 128, 4 x 512; GPU forward: one masked 1024-wide row, 1 x 1024, 2 x 1024; GPU
# d_table: 5, 8, 16 x 128), K = 24 > 16 picks, T = 9 bags (two 8-bag TPU steps, three 4-bag GPU
# programs), T*K = 216 triples (two 128-triple TPU d_table steps; 14 GPU chunks of 16, three
# levels), an odd row count (the bf16 word view pads a row), 40% of the picks on one hot row (a
# segment over several GPU chunks) and 1 in 8 weights 0 (masked picks).
# (fp32 tables take the same kernels' single-row copies, checked at small shapes above.)
BLOCKING_N, BLOCKING_T, BLOCKING_K, HOT_ROW = 37, 9, 24, 3


def _bound(exact, terms_abs_sum, n_terms, dtype):
    """Error bound of an fp32-accumulated sum of `n_terms` products, rounded once to `dtype`.

    Recursive fp32 summation of n fp32-rounded products, in any order or tree, errs by at most
    delta = (n + 1) * 2^-24 * sum|terms| (Higham, gamma_n); the final rounding to `dtype` adds
    half an ulp of the result, at most u * (|exact| + delta) with u = 2^-8 (bf16) or 2^-24.
    Summing in bf16 instead adds up to u * |partial sum| at every addition, ~sqrt(n) to n times
    the final rounding (checked to break this bound below)."""
    u = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-24
    delta = (n_terms + 1) * 2.0**-24 * terms_abs_sum
    return u * (np.abs(exact) + delta) + delta + 1e-30


def _bf16_sequential_sum(terms):
    """`sum(terms, axis=0)` accumulated in bf16, term by term: the wrong kernel."""
    acc = np.zeros(terms.shape[1:], np.float32)
    for term in terms:
        acc = np.asarray(jnp.asarray(acc + term, jnp.float32).astype(jnp.bfloat16), np.float32)
    return acc


def _skewed_inputs(n, d, t, k, dtype, seed=3):
    """numpy-drawn (no per-shape XLA programs to compile): 40% of the picks on HOT_ROW, 1 in 8
    weights 0."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(dtype)
    idx = np.where(rng.random((t, k)) < 0.4, HOT_ROW, rng.integers(0, n, (t, k)))
    w = np.where(rng.random((t, k)) < 1 / 8, 0.0, rng.standard_normal((t, k))).astype(np.float32)
    g = jnp.asarray(rng.standard_normal((t, d), np.float32)).astype(dtype)
    return table, jnp.asarray(idx, jnp.int32), jnp.asarray(w), g


@pytest.mark.parametrize("backend,d", [("gpu", 640), ("gpu", 1024), ("gpu", 2048), ("tpu", 640),
                                       ("tpu", 2048)])  # TPU 1024: 2 blocks of 512, as 2048's 4
def test_kernels_match_exact_sums_at_production_blocking(backend, d):
    n, t, k, dtype = BLOCKING_N, BLOCKING_T, BLOCKING_K, jnp.bfloat16
    table, idx, w, g = _skewed_inputs(n, d, t, k, dtype)

    def kernel(tb, i, ww):
        return embedding_bag(tb, i, ww, impl="pallas_interpret", interpret_backend=backend)

    fn = _grad_fn(kernel, g)
    out, dt, dw = fn(table, idx, w)
    assert (out.dtype, dt.dtype, dw.dtype) == (dtype, dtype, jnp.float32)
    _, dt2, dw2 = fn(table, idx, w)  # deterministic: a second run is bitwise equal
    assert np.array_equal(np.asarray(dt2, np.float32), np.asarray(dt, np.float32))
    assert np.array_equal(np.asarray(dw2), np.asarray(dw))
    # Exact sums in float64 from the same (bf16-representable) inputs.
    t64, w64, g64 = (np.asarray(a, np.float64) for a in (table, w, g))
    i = np.asarray(idx)
    terms = w64[:, :, None] * t64[i]  # [T, K, d]
    out_x, out_s = terms.sum(1), np.abs(terms).sum(1)
    dw_terms = g64[:, None, :] * t64[i]  # [T, K, d]
    dw_x, dw_s = dw_terms.sum(2), np.abs(dw_terms).sum(2)
    dt_terms = (w64[:, :, None] * g64[:, None, :]).reshape(-1, d)  # [T*K, d], pick order
    dt_x, dt_s = np.zeros((n, d)), np.zeros((n, d))
    np.add.at(dt_x, i.reshape(-1), dt_terms)
    np.add.at(dt_s, i.reshape(-1), np.abs(dt_terms))
    uses = np.bincount(i.reshape(-1), minlength=n)
    assert uses[HOT_ROW] > 3 * pallas_gpu.CHUNK  # the hot row spans several GPU chunks
    checks = [("out", out, out_x, _bound(out_x, out_s, k, dtype)),
              ("d_weights", dw, dw_x, _bound(dw_x, dw_s, d, jnp.float32)),
              ("d_table", dt, dt_x, _bound(dt_x, dt_s, uses.max(), dtype))]
    for name, got, exact, bound in checks:
        err = np.abs(np.asarray(got, np.float64) - exact)
        assert (err <= bound).all(), (name, float((err / bound).max()))
    # The bounds reject kernels that sum in bf16: over a bag's K picks, over the hot row's picks.
    out_bf16 = _bf16_sequential_sum(np.moveaxis(terms, 1, 0))
    assert (np.abs(out_bf16 - out_x) > _bound(out_x, out_s, k, dtype)).any()
    hot = i.reshape(-1) == HOT_ROW
    hot_bf16 = _bf16_sequential_sum(dt_terms[hot])
    bound = _bound(dt_x[HOT_ROW], dt_s[HOT_ROW], uses.max(), dtype)
    assert (np.abs(hot_bf16 - dt_x[HOT_ROW]) > bound).any()


def test_gpu_kernels_refuse_tables_whose_offsets_overflow_int32():
    # Triton's element offsets are int32: the production 2^20 x 2048 table (last offset
    # 2^31 - 1) is the largest it takes; one more row would wrap around to negative offsets.
    assert pallas_gpu.supported(2048, 2**20, 16384)
    assert not pallas_gpu.supported(2048, 2**20 + 1, 16384)
    assert not pallas_gpu.supported(2048, 1024, 2**20 + 1)


@pytest.mark.parametrize("backend,n,dtype", [("gpu", 20, jnp.float32),
                                             ("tpu", 21, jnp.bfloat16)])
def test_d_table_skips_masked_picks_and_spreads_a_hot_row(backend, n, dtype):
    """Row sharding masks the picks of other shards to (row 0, weight 0): they must add nothing
    even where d_out is not finite (a kernel that multiplies them in gives 0 * inf = NaN), and
    a row picked 160 times is summed over several GPU chunks and levels / TPU blocks. The TPU
    case has bf16 rows written in word pairs and an odd N (row N - 1 shares its pair with the
    sentinel N)."""
    d, t, k = 128, 8, 40
    kw, kg, ki = jax.random.split(jax.random.key(5), 3)
    table = jnp.zeros((n, d), dtype)
    idx = jnp.where(jnp.arange(t)[:, None] < 4, 0, jax.random.randint(ki, (t, k), 0, n))
    idx = idx.at[5, :3].set(n - 1)
    w = jnp.where(jnp.arange(t)[:, None] < 2, 0.0, jax.random.normal(kw, (t, k)))
    g = jax.random.normal(kg, (t, d), jnp.float32).at[:2].set(jnp.inf)  # masked tokens
    module = {"gpu": pallas_gpu, "tpu": pallas_tpu}[backend]
    if backend == "gpu":
        assert pallas_gpu.segment_levels(t * k) == 3
    else:
        assert t * k > 2 * pallas_tpu.BE  # row 0's segment crosses blocks
    dt = jax.jit(functools.partial(module.d_table, interpret=True))(table, idx, w, g)
    assert np.isfinite(np.asarray(dt, np.float32)).all()
    w64, g64, i = np.asarray(w, np.float64), np.asarray(g, np.float64), np.asarray(idx)
    real = w64 != 0
    terms = w64[real][:, None] * g64[np.nonzero(real)[0]]
    exact, abs_sum = np.zeros((n, d)), np.zeros((n, d))
    np.add.at(exact, i[real], terms)
    np.add.at(abs_sum, i[real], np.abs(terms))
    uses = np.bincount(i[real], minlength=n)
    assert uses[0] >= 2 * k and uses[n - 1] >= 3  # tokens 2, 3: all their picks on row 0
    err = np.abs(np.asarray(dt, np.float64) - exact)
    assert (err <= _bound(exact, abs_sum, uses.max(), dtype)).all()


ROW_DOT_N, ROW_DOT_D, ROW_DOT_T, ROW_DOT_J = 29, 256, 6, 20


def _row_dot_inputs():
    rng = np.random.default_rng(7)
    n, d, t, j = ROW_DOT_N, ROW_DOT_D, ROW_DOT_T, ROW_DOT_J
    table = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((t, d), np.float32)).astype(jnp.bfloat16)
    idx = np.where(rng.random((t, j)) < 0.3, 11, rng.integers(0, n, (t, j)))
    g = jnp.asarray(rng.standard_normal((t, j), np.float32))  # cotangent of act
    return table, jnp.asarray(idx, jnp.int32), x, g


@pytest.mark.parametrize("impl,backend", [("reference", "gpu"), ("pallas_interpret", "gpu"),
                                          ("pallas_interpret", "tpu")])
def test_row_dot_and_its_gradients_match_exact_sums(impl, backend):
    """act = table[idx] . x, d_x = sum_j g * table[idx], d_table[r] = sum g * x over the picks
    of r, against float64 sums: fp32 accumulation bounds (`_bound`), rounded once to the output
    dtype (act fp32, d_x bf16, d_table bf16)."""
    table, idx, x, g = _row_dot_inputs()

    def value_and_grads(table, x):
        def loss(table, x):
            act = row_dot(table, idx, x, impl=impl, interpret_backend=backend)
            return jnp.sum(act * g), act

        (_, act), (dt, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(table, x)
        return act, dt, dx

    act, dt, dx = jax.jit(value_and_grads)(table, x)
    assert (act.dtype, dt.dtype, dx.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    t64, x64, g64 = (np.asarray(a, np.float64) for a in (table, x, g))
    i = np.asarray(idx)
    rows = t64[i]  # [T, J, d]
    act_terms = rows * x64[:, None, :]
    dx_terms = g64[:, :, None] * rows
    dt_terms = (g64[:, :, None] * x64[:, None, :]).reshape(-1, ROW_DOT_D)
    dt_x, dt_s = np.zeros(table.shape), np.zeros(table.shape)
    np.add.at(dt_x, i.reshape(-1), dt_terms)
    np.add.at(dt_s, i.reshape(-1), np.abs(dt_terms))
    uses = np.bincount(i.reshape(-1), minlength=ROW_DOT_N).max()
    checks = [("act", act, act_terms.sum(2), np.abs(act_terms).sum(2), ROW_DOT_D, jnp.float32),
              ("d_x", dx, dx_terms.sum(1), np.abs(dx_terms).sum(1), ROW_DOT_J, jnp.bfloat16),
              ("d_table", dt, dt_x, dt_s, uses, jnp.bfloat16)]
    for name, got, exact, abs_sum, n_terms, dtype in checks:
        err = np.abs(np.asarray(got, np.float64) - exact)
        assert (err <= _bound(exact, abs_sum, n_terms, dtype)).all(), name


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_row_dot_kernel_path_gathers_no_rows(platform):
    """With the kernels, value and gradients lower to the embedding-bag kernels (d_weights for
    act; forward for d_x; d_table) and no `[T, J, d]` tensor; the XLA path builds one."""
    table, idx, x, _ = _row_dot_inputs()
    name = {"cuda": dispatch.GPU_TRITON_CUSTOM_CALL, "tpu": dispatch.TPU_CUSTOM_CALL}[platform]
    gathered = f"tensor<{ROW_DOT_T}x{ROW_DOT_J}x{ROW_DOT_D}x"

    def grads(impl):
        loss = lambda table, x: jnp.sum(row_dot(table, idx, x, impl=impl) ** 2)
        return jax.grad(loss, (0, 1))

    texts = {}
    for impl in ("pallas", "auto"):
        with dispatch.lowering_for(platform):
            texts[impl] = jax.export.export(
                jax.jit(grads(impl)), platforms=[platform],
                disabled_checks=dispatch.export_disabled_checks())(table, x).mlir_module()
    levels = pallas_gpu.segment_levels(ROW_DOT_T * ROW_DOT_J) if platform == "cuda" else 1
    assert texts["pallas"].count(f"@{name}(") == 2 + levels
    assert gathered not in texts["pallas"]
    assert gathered in texts["auto"] and f"@{name}(" not in texts["auto"]


def test_row_dot_bad_shapes_are_named():
    from mnemax.errors import ConfigError

    table, idx, x, _ = _row_dot_inputs()
    with pytest.raises(ConfigError, match=r"x \(6, 128\) must be"):
        row_dot(table, idx, x[:, :128])
    with pytest.raises(ConfigError, match=r"\[N, d\]"):
        row_dot(table[None], idx, x)
    assert row_dot_reference(table, idx, x).shape == (ROW_DOT_T, ROW_DOT_J)
