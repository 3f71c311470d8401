"""Peak FLOP/s per device, for MFU."""

from __future__ import annotations

import os

import jax

# Dense bf16 peak FLOP/s (without sparsity) by substrings of `device.device_kind`.
_PEAK_BF16 = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a10g", 125e12),
    ("l4", 121e12),
    ("v6", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v4", 275e12),
)


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
    kind = device.device_kind.lower()
    for key, peak in _PEAK_BF16:
        if key in kind:
            return peak
    return float("nan")


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over local devices, or None where the backend has no stats."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
