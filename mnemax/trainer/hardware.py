"""Peak FLOP/s per device, for MFU."""

from __future__ import annotations

import os

import jax

# Dense bf16 peak FLOP/s (without sparsity) by accelerator model, from the vendors' datasheets.
# GPUs are looked up by the model in `device_kind` ("NVIDIA H100 80GB HBM3" -> "h100"), TPUs by
# the whole kind ("TPU v5 lite"): exact names, so "L40S" is not taken for "L4".
_GPU_PEAK_BF16 = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a10g": 125e12,
    "l4": 121e12,
    "l40s": 362e12,
}
_TPU_PEAK_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def gpu_model(device_kind: str) -> str:
    """`"NVIDIA H100 80GB HBM3"` -> `"h100"`, `"NVIDIA A100-SXM4-80GB"` -> `"a100"`."""
    words = device_kind.lower().replace("-", " ").split()
    if words and words[0] in ("nvidia", "tesla"):
        words = words[1:]
    return words[0] if words else ""


def peak_flops_for_kind(platform: str, device_kind: str) -> float:
    """Dense bf16 peak FLOP/s of a device kind; NaN when it is not in the tables."""
    if platform == "tpu":
        return _TPU_PEAK_BF16.get(" ".join(device_kind.lower().split()), float("nan"))
    return _GPU_PEAK_BF16.get(gpu_model(device_kind), float("nan"))


def _cpu_peak_flops(num_devices: int) -> float:
    """A rough fp32 peak for the host CPU shared by `num_devices` fake devices.

    cores x clock x 32 FLOPs/cycle (two 8-wide FMA units, AVX2); only meant to make CPU MFU
    figures comparable between runs on the same machine.
    """
    cores = os.cpu_count() or 1
    mhz = 2500.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    mhz = float(line.split(":")[1])
                    break
    except OSError:
        pass
    return cores * mhz * 1e6 * 32 / max(num_devices, 1)


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device (bf16 dense for accelerators, estimated fp32 for CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return _cpu_peak_flops(jax.device_count())
    return peak_flops_for_kind(device.platform, device.device_kind)


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over local devices, or None where the backend has no stats."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
