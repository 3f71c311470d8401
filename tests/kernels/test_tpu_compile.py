"""Every Pallas TPU kernel of mnemax compiles (Mosaic, not just lowers) for TPU v5e and v5p.

libtpu's compile-only topologies compile for a real chip on this CPU host; nothing executes, so
production shapes are fine here. Lowering alone missed "Offsets along tiled dimensions must be
aligned to tiles", which only the Mosaic compile reports. Kernels today:
`embedding_bag/pallas_tpu.py` (forward, d_weights, d_table); gated delta and product keys have
no TPU kernel.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnemax.layers.kernels.dispatch import TPU_CUSTOM_CALL
from mnemax.layers.kernels.embedding_bag import embedding_bag, pallas_tpu

GENERATIONS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1"}
K = 32  # picks per bag: Memory+ (4 heads x top-8)
# (rows, value dim, bags, dtype): a 2^20 x 2048 bf16 table (4 column blocks of 512) with 16,384
# bags; an odd row count (not a multiple of 8 either) at d = 384 (3 blocks of 128) with a bag
# count that is not a multiple of the 8-token block; an fp32 table (unpacked rows) at d = 640.
SHAPES = [(1 << 20, 2048, 16384, jnp.bfloat16), ((1 << 20) - 3, 384, 2050, jnp.bfloat16),
          (1000, 640, 2048, jnp.float32)]


def _mesh(generation: str) -> Mesh:
    """A one-chip mesh of `generation`'s compile-only topology; fails (never skips) without
    libtpu."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu",
                                            topology_name=GENERATIONS[generation])
    except Exception as err:
        pytest.fail(f"libtpu's compile-only topology {GENERATIONS[generation]} is unavailable "
                    f"({err}); pip install -e '.[dev]' installs jax[tpu] with libtpu.")
    return Mesh(np.array(topo.devices[:1]), ("x",))


def _compile(mesh: Mesh, fn, *shapes) -> tuple[str, float]:
    sharding = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # names the chip the kernels lower for (jax >= 0.12 asks for it)
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled.as_text(), time.perf_counter() - start


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-T{s[2]}-{s[3].__name__}")
@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_embedding_bag_kernels_compile(generation, shape):
    """Each of the three kernels alone (d_table from sorted triples: XLA's sort of T*K keys
    takes ~8 s to compile and is not a kernel), at production shapes."""
    mesh = _mesh(generation)
    n, d, t, dtype = shape
    i32, f32 = jnp.int32, jnp.float32
    kernels = [
        (pallas_tpu.forward, ((n, d), dtype), ((t, K), i32), ((t, K), f32)),
        (pallas_tpu.d_weights, ((n, d), dtype), ((t, K), i32), ((t, d), dtype)),
        (pallas_tpu.d_table_sorted, ((n, d), dtype), ((t * K,), i32), ((t * K,), i32),
         ((t * K,), f32), ((t, d), dtype)),
    ]
    for fn, *shapes in kernels:
        text, seconds = _compile(mesh, fn, *shapes)
        print(f"{generation} {fn.__name__} {shape}: compiled in {seconds:.1f} s")
        assert text.count(f'custom_call_target="{TPU_CUSTOM_CALL}"') == 1, fn.__name__


def test_embedding_bag_op_compiles_with_its_gradient_on_v5p():
    """The whole op with `impl="pallas"` (sort included): value and both gradients compile to
    the three kernels; `auto` compiles to none (the XLA path until measured on TPU)."""
    mesh = _mesh("v5p")
    n, d, t = 1 << 20, 2048, 2048
    shapes = (((n, d), jnp.bfloat16), ((t, K), jnp.int32), ((t, K), jnp.float32))

    def value_and_grads(impl):
        def fn(table, idx, w):
            def loss(table, w):
                out = embedding_bag(table, idx, w, impl=impl)
                return jnp.sum(out.astype(jnp.float32) ** 2)

            return jax.value_and_grad(loss, (0, 1))(table, w)

        return fn

    text, seconds = _compile(mesh, value_and_grads("pallas"), *shapes)
    print(f"v5p embedding_bag value_and_grad: compiled in {seconds:.1f} s")
    assert text.count(f'custom_call_target="{TPU_CUSTOM_CALL}"') == 3
    sharding = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]
    with jax.set_mesh(mesh):
        lowered = jax.jit(value_and_grads("auto")).lower(*args).as_text()
    assert TPU_CUSTOM_CALL not in lowered
