"""Every Pallas Triton kernel of mnemax compiles to an H100/H200 (sm_90a) cubin on this CPU host,
at production shapes, without spilling registers and within the chip's registers and shared
memory (`triton_compile`). Needs the `triton` package (the dev extra): without it these tests
fail with the install command instead of skipping."""

import math
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels import triton_compile
from mnemax.layers.kernels.embedding_bag import pallas_gpu as bag
from mnemax.layers.kernels.triton_compile import (
    MAX_REGISTERS,
    SM90_SHARED_BYTES,
    TRITON_INSTALL_HINT,
    TritonModule,
    compile_kernels_sm90,
    compile_sm90,
    production_cases,
    triton_modules,
)

CASES = production_cases()


def _distinct_modules(modules: list[TritonModule]) -> list[TritonModule]:
    """d_table's levels 2 .. L-1 are one kernel: their modules differ from level 2's only in
    integer constants (the row count of the source array) and so in the names MLIR gives
    constants, so level 2 stands for them."""
    if len(modules) <= 3:
        return modules
    shape = lambda m: re.sub(r"\d+", "N", re.sub(r"%c\w*", "%c", m.text))
    assert all(shape(m) == shape(modules[1]) for m in modules[2:-1])
    return [modules[0], modules[1], modules[-1]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.shape}" for c in CASES])
def test_kernel_compiles_for_sm90_without_spills(case):
    modules = triton_modules(case.fn, *case.args)  # d_table: one call per level
    assert len(modules) == (1 if case.kernel != "embedding_bag.d_table" else
                            bag.segment_levels(math.prod(case.args[1].shape)))
    for kernel in map(compile_sm90, _distinct_modules(modules)):
        assert (kernel.num_warps, kernel.num_stages) == (case.num_warps, case.num_stages)
        assert not kernel.problems(), f"{case.kernel} at {case.shape}: {kernel.problems()}"
        assert kernel.spill_store_bytes == kernel.spill_load_bytes == kernel.stack_bytes == 0
        assert 0 < kernel.registers <= MAX_REGISTERS
        assert kernel.shared_bytes <= SM90_SHARED_BYTES
        assert ".target sm_90a" in kernel.ptx


@pytest.mark.parametrize("case", [c for c in CASES if c.kernel in ("embedding_bag.forward",
                                                                   "embedding_bag.d_table")],
                         ids=lambda c: f"{c.kernel}-{c.shape}")
def test_embedding_bag_grids_bound_the_work_per_program(case):
    """Forward: (column blocks, bags / BAGS), the column axis fastest (launch x), whole rows
    up to MAX_ROW columns. d_table: every level's programs take CHUNK sorted triples x
    DTABLE_BD columns whatever the row counts, so a hot row cannot serialise one program."""
    table, idx = case.args[0], case.args[1]
    (_, d), (t, k) = table.shape, idx.shape
    grids = [m.grid for m in triton_modules(case.fn, *case.args)]
    if case.kernel == "embedding_bag.forward":
        bd = bag.forward_tiling(d, k)[0]
        assert bd == (pl.next_power_of_2(d) if d <= bag.MAX_ROW else bag.MAX_ROW)
        assert grids == [(pl.cdiv(d, bd), t // bag.BAGS, 1)]
        return
    entries = t * k
    for grid in grids:
        assert grid == (d // bag.DTABLE_BD, pl.cdiv(entries, bag.CHUNK), 1)
        entries = 2 * grid[1]
    assert grids[-1][1] == 1


def test_every_triton_kernel_has_production_cases():
    """Two or more shapes for each kernel function in every `pallas_gpu.py` module."""
    from mnemax.layers.kernels.gated_delta import pallas_gpu as gdn

    kernels = {"embedding_bag.forward": bag.forward, "embedding_bag.d_weights": bag.d_weights,
               "embedding_bag.d_table": bag.d_table, "gated_delta.inter_chunk":
               gdn.inter_chunk_pallas}
    for name, fn in kernels.items():
        cases = [c for c in CASES if c.kernel == name]
        assert len(cases) >= 2 and all(c.fn is fn for c in cases), name
    assert {c.kernel for c in CASES} == set(kernels)


def test_gated_delta_grid_tiles_the_value_columns():
    """The captured module is the kernel asked for, with its launch grid: one program per
    (batch * head, 32 columns of d_v)."""
    case = next(c for c in CASES if c.kernel == "gated_delta.inter_chunk"
                and c.args[1].shape[-1] == 256)
    [module] = triton_modules(case.fn, *case.args)
    assert module.name == "gated_delta_inter_chunk"
    assert module.grid == (case.args[0].shape[0], 256 // 32, 1)
    assert module.text.startswith("module") and "tt.dot" in module.text


def _spilling_kernel(x_ref, o_ref):
    # All 16,384 values of x stay live across the sum: 512 per thread of one warp, twice the
    # 255 registers a thread can have.
    x = x_ref[...]
    o_ref[...] = x * jnp.sum(x)


def test_spills_are_reported():
    """A kernel that must spill is reported with its stack frame and spill traffic, so a zero
    count in the tests above is a measurement, not a parse that found nothing."""
    shape = jax.ShapeDtypeStruct((16384,), jnp.float32)
    fn = lambda x: pl.pallas_call(
        _spilling_kernel, out_shape=shape,
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))(x)
    [kernel] = compile_kernels_sm90(fn, shape)
    assert kernel.spills and kernel.stack_bytes > 0
    assert kernel.spill_store_bytes > 0 and kernel.spill_load_bytes > 0
    assert "spills registers" in kernel.problems()[0]


def test_missing_triton_fails_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    module = TritonModule("k", "module {}", 4, 1, (1, 1, 1))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'triton==3\.9\.0'"):
        compile_sm90(module)
    assert "triton" in TRITON_INSTALL_HINT


def test_a_function_without_triton_kernels_is_an_error():
    with pytest.raises(ValueError, match="no Pallas Triton kernel"):
        triton_compile.compile_kernels_sm90(jnp.sin, jax.ShapeDtypeStruct((8,), jnp.float32))


# Block-sparse attention's forward, dq and dk/dv kernels, bf16, at moba_1b_32k's shape (32,768
# tokens, 32 heads over 8 kv heads, d = 64, blocks of 512 walked in 64-row tiles, 8 slots) and at
# NSA's (d = 128, blocks of 64, one list per 16 queries shared by the 4 q heads of a GQA group:
# 64-row query tiles of 16 tokens x 4 heads, 64-row key tiles). ptxas registers (Triton 3.9,
# sm_90a), no spills in any:
#   d=64, block 512:  fwd 124, dq 124, dkdv 214      d=64, block 64:  fwd 124, dq 125, dkdv 204
#   d=128, block 64:  fwd 125, dq 183, dkdv 195      d=128, block 512: fwd 124, dq 188, dkdv 207
#   d=128, block 64, query groups of 16 per head: fwd 122, dq 123, dkdv 189 (16-row query
#   tiles, 4 warps); shared by the GQA group: fwd 126, dq 182, dkdv 195 (64-row tiles, 8 warps)
# (dk/dv at d = 128 walks 32-row query steps; with 64 it used all 255 registers.)
@pytest.mark.parametrize("d,block,query_block,shared", [(64, 512, None, False),
                                                        (128, 64, 16, True)])
def test_block_sparse_attention_compiles_for_sm90_without_spills(d, block, query_block, shared):
    from mnemax.layers.kernels.block_sparse_attention import pallas_gpu as bsa

    t, heads, kv_heads, slots = 32768, 32, 8, 8
    groups = t // (query_block or block)
    rows = heads // kv_heads if shared else 1
    s = jax.ShapeDtypeStruct
    args = (s((1, t, heads, d), jnp.bfloat16), s((1, t, kv_heads, d), jnp.bfloat16),
            s((1, t, kv_heads, d), jnp.bfloat16), s((1, heads, groups, slots), jnp.int32),
            s((1, heads, t, slots), jnp.bool_))

    def loss(q, k, v, block_indices, slot_mask):
        out = bsa.attention(q, k, v, block_indices, slot_mask, block_size=block, window=None,
                            scale=d ** -0.5, query_block=query_block, shared_group_lists=shared)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))
    kernels = compile_kernels_sm90(grads, *args)
    assert [k.name for k in kernels] == ["block_sparse_attention_fwd", "block_sparse_attention_dq",
                                         "block_sparse_attention_dkdv"]
    q_tile, k_tile = min(bsa.TILE, (query_block or block) * rows), min(bsa.TILE, block)
    assert [k.grid for k in kernels] == [(t * rows // q_tile, 1, heads // rows)] * 2 + [
        (t // k_tile, 1, kv_heads)]
    for kernel, tile in zip(kernels, (q_tile, q_tile, k_tile), strict=True):
        print(f"d={d} block {block} query_block {query_block} shared {shared} {kernel.name}: "
              f"{kernel.registers} registers, {kernel.spill_store_bytes} B spilled")
        assert kernel.num_warps == bsa.num_warps(tile, d)
        assert not kernel.problems(), f"{kernel.name} at d={d}: {kernel.problems()}"
        assert kernel.spill_store_bytes == kernel.spill_load_bytes == kernel.stack_bytes == 0
        assert 0 < kernel.registers <= MAX_REGISTERS
        assert ".target sm_90a" in kernel.ptx
