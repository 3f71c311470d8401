"""The planner's analytic side: memory sizes, hardware constants and a step-time model.

Step time = compute + collectives + host transfers, added up (no overlap assumed, so it is an
upper bound; it is used to rank configurations, not to promise a speed):
- compute: training FLOPs per token (`recipe.model.flops_per_token`) x tokens per step x the
  remat policy's recompute factor, over devices x peak FLOP/s (`mnemax.trainer.hardware`) x
  `MATMUL_EFFICIENCY`;
- collectives: ring all-gathers / reduce-scatters move S (n - 1) / n bytes per device for a tensor
  of S bytes over n devices, all-reduces twice that, at the intra-node link bandwidth when the
  group fits in one node and the inter-node bandwidth otherwise; a mixture of experts under
  expert parallelism adds its token all-to-alls;
- host transfers: offloaded optimizer state in and out once per step, offloaded activations out
  and back once per micro-batch, over PCIe.
"""

from __future__ import annotations

import dataclasses
import re

from mnemax.errors import ConfigError

# Fraction of peak FLOP/s the matmuls reach in a well-tuned step (MFU ~50% on H100 for
# 1B-10B dense models).
MATMUL_EFFICIENCY = 0.5
# Mesh axes from outermost to innermost: jax.make_mesh puts the last axis on neighbouring
# devices, so a group over an axis spans that axis times every axis inside it.
AXIS_ORDER = ("data", "fsdp", "tensor", "expert", "seq")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device figures of one accelerator kind in an 8-device node."""

    kind: str  # substring of jax's device_kind, e.g. "h100"
    memory_bytes: int  # device memory (HBM), the default budget
    node_size: int  # devices sharing the fast intra-node links
    intra_node_bytes_per_s: float  # one direction, per device (NVLink)
    inter_node_bytes_per_s: float  # one direction, per device (one NIC per device)
    host_bytes_per_s: float  # device <-> pinned host memory (PCIe), one direction
    platform: str = "gpu"  # "gpu", or "tpu" (then `kind` is jax's device_kind, "TPU v5")
    # Share of `memory_bytes` the planner leaves unplanned: what the compiled peak it checks
    # does not see (see GPU_MEMORY_MARGIN and TPU_MEMORY_MARGIN).
    memory_margin: float = 0.0

    @property
    def peak_flops(self) -> float:
        """Dense bf16 peak FLOP/s from `mnemax.trainer.hardware`'s table."""
        from mnemax.trainer.hardware import peak_flops_for_kind

        return peak_flops_for_kind(self.platform, self.kind)


# GPU plans check XLA:CPU's compiled peak, a stand-in: XLA:GPU assigns buffers differently,
# and the CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers (1-3 GB on an H100) sit outside
# XLA's count. A candidate must fit in 90% of the budget.
GPU_MEMORY_MARGIN = 0.10
# TPU plans check the real TPU compiler's peak; the runtime keeps a little HBM for itself
# (program binaries, infeed / outfeed, collectives' scratch). A candidate must fit in 95%.
TPU_MEMORY_MARGIN = 0.05

# NVLink 4 (H100/H200): 900 GB/s both ways; NDR InfiniBand 400 Gb/s per GPU; PCIe 5.0 x16
# ~55 GB/s achieved. A100: NVLink 3 600 GB/s, HDR 200 Gb/s, PCIe 4.0 ~25 GB/s. B200: NVLink 5.
HARDWARE = {
    "h100": Hardware("h100", 80 * 10**9, 8, 450e9, 50e9, 55e9, "gpu", GPU_MEMORY_MARGIN),
    "h200": Hardware("h200", 141 * 10**9, 8, 450e9, 50e9, 55e9, "gpu", GPU_MEMORY_MARGIN),
    "a100": Hardware("a100", 80 * 10**9, 8, 300e9, 25e9, 25e9, "gpu", GPU_MEMORY_MARGIN),
    "b200": Hardware("b200", 180 * 10**9, 8, 900e9, 50e9, 55e9, "gpu", GPU_MEMORY_MARGIN),
}
# TPU chips by jax's device_kind, for the planner's pre-ranking (its final ranking uses the TPU
# compiler's own step estimate). A slice is one ICI domain (node_size = the largest slice);
# ICI per chip, one direction, from Cloud TPU's pages (v4 2400, v5e 1600, v5p 4800, v6e 3584
# Gbit/s both ways); host transfers over PCIe 4.0 (~25 GB/s). HBM: `mnemax.launch.compile`.
_GIB = 2**30
TPU_HARDWARE = {
    "TPU v4": Hardware("TPU v4", 32 * _GIB, 4096, 150e9, 25e9, 25e9, "tpu", TPU_MEMORY_MARGIN),
    "TPU v5 lite": Hardware("TPU v5 lite", 16 * _GIB, 256, 100e9, 25e9, 25e9, "tpu",
                            TPU_MEMORY_MARGIN),
    "TPU v5": Hardware("TPU v5", 95 * _GIB, 8960, 300e9, 25e9, 25e9, "tpu", TPU_MEMORY_MARGIN),
    "TPU v6 lite": Hardware("TPU v6 lite", 32 * _GIB, 256, 224e9, 25e9, 25e9, "tpu",
                            TPU_MEMORY_MARGIN),
}


def hardware(kind: str) -> Hardware:
    """The `HARDWARE` entry for `kind` (case-insensitive), or a ConfigError listing them."""
    key = kind.strip().lower()
    if key not in HARDWARE:
        raise ConfigError(f"--device-kind {kind!r} is unknown; choose one of "
                          f"{', '.join(HARDWARE)}")
    return HARDWARE[key]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """`"80GB"` -> 80e9 bytes (KB, MB, GB, TB are powers of 1000); `"80GiB"` and `"80G"` ->
    80 * 2**30 (KiB.. and the bare K, M, G, T letters are powers of 1024); `"1024"` -> bytes."""
    match = _SIZE.match(text)
    if not match or (match.group(3) and not match.group(2)):
        raise ConfigError(
            f"memory size {text!r} is not understood; write a number and a unit, e.g. 80GB "
            "(80 x 10^9 bytes), 80GiB or 80G (80 x 2^30 bytes), 512MiB"
        )
    number, prefix, binary, byte = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    base = 1024 if (binary or (prefix and not byte)) else 1000
    size = int(float(number) * base**power)
    if size <= 0:
        raise ConfigError(f"memory size {text!r} must be more than 0 bytes, e.g. 80GB, 80GiB "
                          "or 80G")
    return size


def format_bytes(n: float) -> str:
    """`85899345920` -> `"80.00 GiB"`."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    """`0.0123` -> `"12.3 ms"`."""
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def recompute_factor(remat: str, attention_share: float) -> float:
    """Training FLOPs with recompute over training FLOPs without (forward = 1/3 of them).

    none 1; full 4/3 (the whole forward again, Chen et al. 2016); dots_saveable 1.02 (only the
    element-wise ops, memory-bound: +2%); dots_with_no_batch_dims_saveable 1.02 + the attention
    share / 3 (its batched matmuls QK^T and AV are recomputed); save_names / offload_names of the
    attention and MLP intermediates: the attention scores and ~10% of the other matmuls (the
    output projection) again: 1.02 + attention / 3 + (1 - attention) / 30.
    """
    kind = remat.partition(":")[0]
    if kind == "none":
        return 1.0
    if kind == "full":
        return 4.0 / 3.0
    if kind == "dots_saveable":
        return 1.02
    if kind == "dots_with_no_batch_dims_saveable":
        return 1.02 + attention_share / 3.0
    return 1.02 + attention_share / 3.0 + (1.0 - attention_share) / 30.0


def _span(axes: tuple[str, ...], mesh: dict[str, int]) -> int:
    """Devices a group over `axes` spans: the outermost of them times every axis inside it."""
    outer = min(AXIS_ORDER.index(a) for a in axes)
    span = 1
    for name in AXIS_ORDER[outer:]:
        span *= mesh.get(name, 1)
    return span


def _ring(bytes_: float, axes: tuple[str, ...], mesh: dict[str, int], hw: Hardware,
          all_reduce: bool = False) -> float:
    """Seconds of a ring all-gather / reduce-scatter (all-reduce: twice) of `bytes_` in all."""
    n = 1
    for a in axes:
        n *= mesh.get(a, 1)
    if n == 1:
        return 0.0
    bandwidth = (hw.intra_node_bytes_per_s if _span(axes, mesh) <= hw.node_size
                 else hw.inter_node_bytes_per_s)
    return (2.0 if all_reduce else 1.0) * bytes_ * (n - 1) / n / bandwidth


@dataclasses.dataclass(frozen=True)
class ExpertTraffic:
    """What a mixture of experts adds to the collectives (`mnemax.layers.moe`)."""

    expert_params: int  # routed experts' parameters, split over the `expert` mesh axis
    moe_layers: int  # blocks holding the MoE
    tokens_per_device: int  # tokens one device routes per step (all micro-batches)
    topk: int
    d_model: int
    value_bytes: int  # bytes of one activation value (the compute dtype)
    ragged: bool  # the exchange moves kept rows only (TPU), or padded [n, T k, D] blocks


def _zero_seconds(g: float, stage: int, mesh: dict[str, int], grad_accum: int, hw: Hardware,
                  replicas: tuple[str, ...]) -> float:
    """ZeRO traffic of `g` bytes of fp32 gradients / parameters whose copies sit on the devices
    of `replicas` (the data-parallel axes, fsdp among them)."""
    if stage == 0:
        return _ring(g, replicas, mesh, hw, all_reduce=True)
    if stage == 1:
        return _ring(g, replicas, mesh, hw, all_reduce=True) + _ring(g, replicas, mesh, hw)
    if stage == 2:
        return 2.0 * _ring(g, replicas, mesh, hw)
    per_micro = 3.0 * _ring(g, ("fsdp",), mesh, hw)
    outer = tuple(a for a in replicas if a != "fsdp")
    return (grad_accum * per_micro
            + _ring(g / mesh.get("fsdp", 1), outer, mesh, hw, all_reduce=True))


def collective_seconds(params: int, stage: int, mesh: dict[str, int], grad_accum: int,
                       hw: Hardware, experts: ExpertTraffic | None = None,
                       remat: str = "none") -> float:
    """ZeRO traffic per step of fp32 gradients and parameters (4 bytes each, split over
    `tensor`): stage 0 all-reduces the gradients over the data-parallel axes; stage 1 also
    all-gathers the updated parameters; stage 2 reduce-scatters the gradients and all-gathers the
    parameters; stage 3 all-gathers each layer's parameters over fsdp in the forward and the
    backward pass and reduce-scatters its gradients, for every micro-batch, then reduce-scatters
    the gradient shards over the other data-parallel axes (`zero_layout` splits gradients and
    moments over all of them) and all-gathers the updated parameter shards: the bytes of one
    all-reduce. Tensor-parallel activation reductions are not counted.

    Under expert parallelism (`experts`, an `expert` axis above 1) the `expert` axis is data
    parallel for every parameter but the routed experts', which it splits (their copies sit on
    data x fsdp only); and each MoE block exchanges its tokens' k rows of d_model values with
    all-to-alls over `expert`: there and back in the forward pass, both again in the backward
    pass, and the forward pair once more when remat reruns the block. An all-to-all sends
    (n - 1) / n of its bytes off the device: the kept rows (ragged), or n blocks of T k rows
    (padded)."""
    n_expert = mesh.get("expert", 1)
    g = 4.0 * params / mesh.get("tensor", 1)
    if experts is None or n_expert == 1:
        return _zero_seconds(g, stage, mesh, grad_accum, hw, ("data", "fsdp", "expert"))
    g_experts = 4.0 * experts.expert_params / mesh.get("tensor", 1)
    seconds = (_zero_seconds(g - g_experts, stage, mesh, grad_accum, hw,
                             ("data", "fsdp", "expert"))
               + _zero_seconds(g_experts / n_expert, stage, mesh, grad_accum, hw,
                               ("data", "fsdp")))
    rows = experts.tokens_per_device * experts.topk * (1 if experts.ragged else n_expert)
    exchange = _ring(rows * experts.d_model * experts.value_bytes, ("expert",), mesh, hw)
    passes = 4 if remat == "none" else 6
    return seconds + passes * experts.moe_layers * exchange


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Estimated seconds per step and its parts."""

    compute_s: float
    collective_s: float
    host_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.collective_s + self.host_s


def step_time(*, flops_per_step: float, attention_share: float, params: int, stage: int,
              remat: str, grad_accum: int, mesh: dict[str, int], host_state_bytes: float,
              host_activation_bytes: float, hw: Hardware,
              experts: ExpertTraffic | None = None) -> StepTime:
    """Estimated step time of one configuration (see the module docstring).

    `host_state_bytes`: optimizer state one device keeps in host memory (in and out once per
    step); `host_activation_bytes`: residuals one device offloads per micro-batch (out in the
    forward pass, back in the backward pass)."""
    devices = 1
    for size in mesh.values():
        devices *= size
    compute = (flops_per_step * recompute_factor(remat, attention_share)
               / (devices * hw.peak_flops * MATMUL_EFFICIENCY))
    host = 2.0 * (host_state_bytes + grad_accum * host_activation_bytes) / hw.host_bytes_per_s
    return StepTime(compute, collective_seconds(params, stage, mesh, grad_accum, hw, experts,
                                                remat), host)
