"""Compile mnemax's Pallas Triton kernels to H100/H200 (sm_90a) binaries on a host with no GPU.

JAX has no compile-only GPU target, but Pallas lowers a GPU kernel to a Triton module, and the
`triton` package compiles a Triton module for any NVIDIA target without a GPU:

1. `triton_modules(fn, *args)` lowers `jax.jit(fn)` for CUDA (an abstract H100 named through
   `dispatch.lowering_for`) and returns each Pallas Triton call's module as *text*, with the
   warps, stages and grid the kernel was configured with. The custom call carries the module as
   MLIR bytecode, which another Triton version cannot read ("expected mlir::BoolAttr, but got:
   1 : i32"); jaxlib's own Triton dialect reads it back and prints it.
2. `compile_sm90(module)` compiles the text with `triton.compile(..., GPUTarget("cuda", 90, 32))`
   to PTX and a cubin, and reads registers, spills and stack from `ptxas -v` run with the flags
   Triton used for the cubin (Triton's bundled ptxas, which reads the PTX version Triton writes;
   the output is checked to be the very cubin Triton built). Shared memory is Triton's dynamic
   allocation for the kernel, what a launch requests.

The binary is Triton's (the `triton` package), not the one XLA builds at run time with the
Triton it links, so counts can differ a little from a GPU run; a spill here is still a spill
there. Speed needs a GPU (`benchmarks/`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax

from mnemax.layers.kernels import dispatch

# H100 / H200 limits per thread block: 255 registers per thread, and 227 KiB of shared memory
# per block (cudaDevAttrMaxSharedMemoryPerBlockOptin = 232448 bytes; Triton refuses to launch a
# kernel asking for more).
MAX_REGISTERS = 255
SM90_SHARED_BYTES = 227 * 1024
# The flags Triton 3.9 passes to ptxas for the cubin (`make_cubin` in
# triton/backends/nvidia/compiler.py), so `ptxas -v` reports on the same binary.
_PTXAS_FLAGS = ("-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a")
TRITON_INSTALL_HINT = ("the GPU compile check needs the `triton` package: pip install "
                       "'triton==3.9.0' (Linux x86_64 or aarch64; mnemax's dev extra installs it)")


@dataclasses.dataclass(frozen=True)
class TritonModule:
    """One Pallas Triton kernel as lowered for CUDA: its module text and launch configuration."""

    name: str
    text: str  # the Triton (tt dialect) module, MLIR text
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Sm90Kernel:
    """What ptxas made of one kernel for sm_90a. Byte counts are per thread except shared."""

    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory per program (Triton's allocation)
    ptx: str = dataclasses.field(repr=False)

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)

    def problems(self) -> list[str]:
        """What would make this kernel slow or unlaunchable on an H100; empty if none."""
        out = []
        if self.spills or self.stack_bytes:
            out.append(f"spills registers to local memory ({self.stack_bytes} B stack frame, "
                       f"{self.spill_store_bytes} B spill stores, {self.spill_load_bytes} B "
                       "spill loads per thread)")
        if self.registers > MAX_REGISTERS:
            out.append(f"uses {self.registers} registers per thread (> {MAX_REGISTERS})")
        if self.shared_bytes > SM90_SHARED_BYTES:
            out.append(f"needs {self.shared_bytes} B of shared memory per program "
                       f"(> {SM90_SHARED_BYTES} B on an H100)")
        return out


# --- The private JAX hook: reading Pallas's Triton module out of the lowered program. ---------
# jax 0.10 and 0.12 both lower a Pallas Triton call to a `__gpu$xla.gpu.triton` custom call whose
# backend config holds `ir` (the module's bytecode), `name`, `num_warps`, `num_stages` and
# `grid_{x,y,z}`; the bytecode is read back in an MLIR context with jaxlib's Triton dialect.


def _custom_calls(op) -> Iterator[Any]:
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if inner.operation.name == "stablehlo.custom_call":
                    yield inner.operation
                yield from _custom_calls(inner.operation)


def _module_from_custom_call(call) -> TritonModule:
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    config = call.attributes["mhlo.backend_config"]
    integer = lambda key: ir.IntegerAttr(config[key]).value
    bytecode = ir.StringAttr(config["ir"]).value_bytes
    module = ir.Module.parse(bytecode, context=triton_lowering._new_ir_context())
    return TritonModule(name=ir.StringAttr(config["name"]).value,
                        text=module.operation.get_asm(enable_debug_info=False),
                        num_warps=integer("num_warps"), num_stages=integer("num_stages"),
                        grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")))


def triton_modules(fn: Callable, *args: Any) -> list[TritonModule]:
    """The Pallas Triton kernels of `jax.jit(fn)(*args)`, as lowered for an H100, in program
    order. `args` are arrays or `jax.ShapeDtypeStruct`s; nothing is allocated or run."""
    with warnings.catch_warnings():
        # jax 0.12 announces that Pallas's Triton backend is deprecated, at every lowering.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated")
        with dispatch.lowering_for(dispatch.H100):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    return [_module_from_custom_call(call) for call in _custom_calls(module.operation)
            if str(call.attributes["call_target_name"]).strip('"')
            == dispatch.GPU_TRITON_CUSTOM_CALL]


# --- Triton and ptxas. ------------------------------------------------------------------------

def _triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        raise ModuleNotFoundError(TRITON_INSTALL_HINT) from e
    return triton, GPUTarget, get_ptxas


_PTXAS_FUNCTION = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_sm90(module: TritonModule) -> Sm90Kernel:
    """Compiles `module` for sm_90a with its warps and stages; raises on a compile error."""
    triton, gpu_target, get_ptxas = _triton()
    with tempfile.TemporaryDirectory(prefix="mnemax-sm90-") as tmp:
        source = pathlib.Path(tmp, f"{module.name}.ttir")
        source.write_text(module.text)
        compiled = triton.compile(
            str(source), target=gpu_target("cuda", 90, 32),
            options={"num_warps": module.num_warps, "num_stages": module.num_stages,
                     "enable_fp_fusion": True})  # Triton's default, stated to keep it quiet
        ptx = pathlib.Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        cubin = pathlib.Path(tmp, "kernel.cubin")
        log = subprocess.run([get_ptxas(90).path, *_PTXAS_FLAGS, str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True, check=True).stderr
        if cubin.read_bytes() != compiled.asm["cubin"]:
            raise RuntimeError(f"{module.name}: ptxas -v built another cubin than Triton did; "
                               "its counts would not describe Triton's binary (Triton's ptxas "
                               f"flags changed? expected {_PTXAS_FLAGS}).")
    function, registers = _PTXAS_FUNCTION.search(log), _PTXAS_REGISTERS.search(log)
    if function is None or registers is None:
        raise RuntimeError(f"{module.name}: cannot read ptxas -v output:\n{log}")
    stack, stores, loads = map(int, function.groups())
    return Sm90Kernel(name=module.name, num_warps=module.num_warps,
                      num_stages=module.num_stages, grid=module.grid,
                      registers=int(registers.group(1)), spill_store_bytes=stores,
                      spill_load_bytes=loads, stack_bytes=stack,
                      shared_bytes=compiled.metadata.shared, ptx=compiled.asm["ptx"])


def compile_kernels_sm90(fn: Callable, *args: Any) -> list[Sm90Kernel]:
    """`compile_sm90` of every Pallas Triton kernel in `jax.jit(fn)(*args)`."""
    _triton()  # the install hint before a lowering that would be wasted
    modules = triton_modules(fn, *args)
    if not modules:
        raise ValueError(f"{getattr(fn, '__name__', fn)} lowers to no Pallas Triton kernel for "
                         "CUDA; pass the kernel function itself (impl='pallas' for an op).")
    return [compile_sm90(m) for m in modules]


# --- mnemax's kernels at production shapes. ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One Pallas Triton kernel of mnemax at one shape, ready for `compile_kernels_sm90`."""

    kernel: str  # the kernel function, `<op>.<function>`
    shape: str  # its sizes, for people
    fn: Callable
    args: tuple[jax.ShapeDtypeStruct, ...]
    num_warps: int  # what the kernel is configured with, to check the lowering carries it
    num_stages: int


def production_cases() -> list[KernelCase]:
    """Every Pallas Triton kernel of mnemax at two or more production shapes.

    Embedding bag (Memory+ value reads): a 2^20-row bf16 table, 32 picks per bag, value dims 384
    (three column blocks of 128) and 2,048 (eight of 256), 4,096 and 16,384 bags. Gated delta's
    scan over chunks: batch 8 x 32 heads, 2,048 tokens in chunks of 64 (the layer's default),
    d_k = d_v = 128 (`gdn_1b`), 64, and d_v = 256 (values expanded 2x, as in fla's GatedDeltaNet).
    """
    from mnemax.layers.kernels.embedding_bag import pallas_gpu as bag
    from mnemax.layers.kernels.gated_delta import pallas_gpu as gdn

    s = jax.ShapeDtypeStruct
    bf16, f32, i32 = jax.numpy.bfloat16, jax.numpy.float32, jax.numpy.int32
    cases = []
    for d, bags in ((384, 4096), (2048, 16384)):
        table, picks = s((1 << 20, d), bf16), (bags, 32)
        idx, w, d_out = s(picks, i32), s(picks, f32), s((bags, d), bf16)
        shape = f"table 2^20x{d} bf16, {bags} bags x 32 picks"
        for name, fn, args in (("forward", bag.forward, (table, idx, w)),
                               ("d_weights", bag.d_weights, (table, idx, d_out)),
                               ("d_table", bag.d_table, (table, idx, w, d_out))):
            cases.append(KernelCase(f"embedding_bag.{name}", shape, fn, args, bag.NUM_WARPS, 2))
    bh, chunks, chunk = 8 * 32, 2048 // 64, 64
    for d_k, d_v in ((128, 128), (64, 64), (128, 256)):
        args = (s((bh, chunks, chunk, d_k), f32), s((bh, chunks, chunk, d_v), f32),
                s((bh, chunks, chunk, chunk), f32), s((bh, chunks, chunk, d_k), f32),
                s((bh, chunks, chunk, d_k), f32), s((bh, chunks), f32), s((bh, d_k, d_v), f32))
        cases.append(KernelCase(
            "gated_delta.inter_chunk", f"{bh} batch*heads, {chunks} chunks of {chunk}, d_k={d_k}, "
            f"d_v={d_v}", gdn.inter_chunk_pallas, args, gdn.GPU_NUM_WARPS, gdn.GPU_NUM_STAGES))
    return cases
