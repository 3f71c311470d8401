"""The ops that layers call in their hot loops, one folder per op (flash-linear-attention's
layout):

    <op>/reference.py    plain jnp: the ground truth, and the XLA path
    <op>/pallas_gpu.py   Triton kernels (Pallas GPU)           where the op has them
    <op>/pallas_tpu.py   Mosaic kernels (Pallas TPU)           where the op has them
    <op>/chunk.py ...    other algorithms of the same op (gated delta's chunk form)
    <op>/op.py           the public op: input checks, `dispatch.select`, `custom_vjp`
    <op>/__init__.py     exports the public op

Every op takes `impl` from one vocabulary (`dispatch.IMPLS`) and picks its backend with
`dispatch.select`; `dispatch.lowering_for` lowers the kernels for a chip this host lacks.
`tiling.py` holds block-size arithmetic the kernels share; `triton_compile.py` compiles the
Triton kernels to sm_90a cubins on any machine and reads their registers and spills.
"""
