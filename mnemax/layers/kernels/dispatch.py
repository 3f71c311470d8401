"""Backend selection shared by the kernel ops in `mnemax/layers/kernels/`.

Every op exposes `impl in {"auto", "reference", "pallas", "pallas_interpret"}` and chooses
through `select`:

- `"auto"`: the kernel on the platforms the op lists in `auto_platforms` (those where a
  benchmark showed the kernel faster than the XLA path; see `benchmarks/RESULTS.md`), the
  reference everywhere else. Chosen by `jax.lax.platform_dependent` when the function is
  *lowered* for a platform, not from `jax.default_backend()`, so a function traced on a
  CPU-only host still carries the GPU and TPU kernels: `jax.export(..., platforms=["cuda"])`
  works from a laptop inside `lowering_for("cuda")`, which names the chip the kernels are built
  for (jax >= 0.12 refuses to lower a Pallas kernel for a platform with no device of that kind
  and no named chip).
- `"reference"`: the plain-jnp path everywhere (no Pallas). An op with several jnp algorithms
  (gated delta's chunk and recurrent forms) picks among them with an argument of its own.
- `"pallas"`: the compiled kernel of the platform it is lowered for. CPU has no compiled Pallas
  kernel, so there it runs the kernel in interpret mode (slow; for checking, not for training).
- `"pallas_interpret"`: the kernel in interpret mode on any platform; `interpret_backend`
  ("gpu" or "tpu") says which of the two kernels to interpret.

`unrolled_loops()` makes the ops' own XLA loops (`loop_unroll`) trace fully unrolled, for
costing compiles: XLA's cost analysis counts a while loop's body once.

Custom-call names that a kernel leaves in exported StableHLO (needed for
`jax.export.DisabledSafetyCheck.custom_call` when exporting): `GPU_TRITON_CUSTOM_CALL`
and `TPU_CUSTOM_CALL`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Collection, Iterator
from typing import Literal, get_args

import jax

Impl = Literal["auto", "reference", "pallas", "pallas_interpret"]
IMPLS = get_args(Impl)
INTERPRET_BACKENDS = ("gpu", "tpu")
GPU_TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
TPU_CUSTOM_CALL = "tpu_custom_call"

_UNROLL_LOOPS = contextvars.ContextVar("mnemax_unroll_loops", default=False)


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """Functions traced inside it get the ops' XLA loops (Gated DeltaNet's scan over chunks, the
    block-sparse gathered path's steps) fully unrolled: the same work with no while loop, so
    XLA's cost analysis, which counts a loop body once, counts every iteration. For costing
    compiles (`mnemax compile`'s loop-free twin); the program is larger and compiles slower, and
    a jitted function traced before keeps its loops (jit caches traces, not this setting)."""
    token = _UNROLL_LOOPS.set(True)
    try:
        yield
    finally:
        _UNROLL_LOOPS.reset(token)


def loop_unroll() -> bool | int:
    """`unroll` for an op's `lax.scan`: True (no loop) inside `unrolled_loops()`, else 1."""
    return True if _UNROLL_LOOPS.get() else 1


@dataclasses.dataclass(frozen=True)
class Chip:
    """A chip to lower kernels for, on a host that may not have it."""

    platform: str  # the lowering platform: "cuda" or "tpu"
    device_kind: str  # as `jax.Device.device_kind` reports it; jax picks the kernel target from it
    num_cores: int  # streaming multiprocessors of a GPU; TensorCores per jax device of a TPU


# One current chip per platform, for lowering from a host without it. H100 SXM: 132 SMs,
# compute capability 9.0. TPU v5p: two TensorCores per chip, one jax device (megacore).
H100 = Chip("cuda", "NVIDIA H100", 132)
TPU_V5P = Chip("tpu", "TPU v5p", 2)
DEFAULT_CHIPS = {"cuda": H100, "tpu": TPU_V5P}
_DEVICE_PLATFORM = {"cuda": "gpu", "tpu": "tpu"}  # what a jax device of that chip reports


@contextlib.contextmanager
def lowering_for(chip: Chip | str) -> Iterator[Chip]:
    """Lowers the Pallas kernels inside this context for `chip` (a `Chip`, or "cuda" / "tpu"
    for `DEFAULT_CHIPS`), whatever devices this host has.

    Use it around `jax.export.export(..., platforms=[chip.platform])` or `.lower(...)`; it
    sets an abstract mesh whose device is `chip`, keeping the axes of the mesh already in
    context (so it composes with `jax.set_mesh`). Lower inside it, don't run: jax treats the
    context's device as the one computations are for.
    """
    if isinstance(chip, str):
        if chip not in DEFAULT_CHIPS:
            raise ValueError(f"lowering_for({chip!r}): no kernels for that platform; name one of "
                             f"{tuple(DEFAULT_CHIPS)} or pass a Chip.")
        chip = DEFAULT_CHIPS[chip]
    if chip.platform not in _DEVICE_PLATFORM:
        raise ValueError(f"Chip platform {chip.platform!r} is not one of "
                         f"{tuple(_DEVICE_PLATFORM)}; mnemax has kernels for those only.")
    device = jax.sharding.AbstractDevice(device_kind=chip.device_kind, num_cores=chip.num_cores,
                                         platform=_DEVICE_PLATFORM[chip.platform])
    mesh = jax.sharding.get_abstract_mesh().update(abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield chip


def check_impl(impl: str, interpret_backend: str = "gpu") -> None:
    """Raises ValueError naming the bad value if `impl` / `interpret_backend` is unknown."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}; use 'auto' unless you are "
                         "testing a specific kernel.")
    if interpret_backend not in INTERPRET_BACKENDS:
        raise ValueError(f"interpret_backend={interpret_backend!r} is not one of "
                         f"{INTERPRET_BACKENDS}.")


def export_disabled_checks() -> list:
    """The `disabled_checks` that `jax.export.export` needs for mnemax's Pallas kernels."""
    return [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in (GPU_TRITON_CUSTOM_CALL, TPU_CUSTOM_CALL)]


def select(
    impl: str,
    *,
    reference: Callable,
    gpu: Callable | None,
    tpu: Callable | None,
    gpu_interpret: Callable | None,
    tpu_interpret: Callable | None,
    auto_platforms: Collection[str],
    interpret_backend: str = "gpu",
) -> Callable:
    """Returns the function `impl` asks for; all callables take the same positional arguments.

    A kernel given as None means "this op has no such kernel for these shapes": that platform
    falls back to `reference` (for "auto" and "pallas") or raises (for "pallas_interpret").
    `auto_platforms` ("cuda", "tpu"): where `auto` runs the kernel; name a platform only once
    the kernel was measured faster there than the XLA path.
    """
    check_impl(impl, interpret_backend)
    unknown = set(auto_platforms) - set(DEFAULT_CHIPS)
    if unknown:
        raise ValueError(f"auto_platforms {sorted(unknown)} are not kernel platforms; name some "
                         f"of {tuple(DEFAULT_CHIPS)}.")
    if impl == "reference":
        return reference
    interpret = gpu_interpret if interpret_backend == "gpu" else tpu_interpret
    if impl == "pallas_interpret":
        if interpret is None:
            raise ValueError(f"this op has no {interpret_backend} kernel (for these shapes); use "
                             "impl='reference' or the other interpret_backend.")
        return interpret
    kernels = {"cuda": gpu, "tpu": tpu}
    if impl == "auto":
        kernels = {p: kernels[p] for p in auto_platforms}
        default = reference
    else:  # "pallas" off GPU/TPU: the interpreted kernel
        default = interpret if interpret is not None else reference
    branches = {p: k for p, k in kernels.items() if k is not None}
    if not branches and default is reference:
        return reference  # nothing to choose: no dead branches in the lowered program

    def dispatched(*args):
        return jax.lax.platform_dependent(*args, **{p: branches.get(p, reference)
                                                    for p in kernels}, default=default)

    return dispatched
