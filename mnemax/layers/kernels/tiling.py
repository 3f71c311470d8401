"""Block-size arithmetic shared by the Pallas kernels."""

from __future__ import annotations


def is_pow2(n: int, at_least: int = 1) -> bool:
    """Whether `n` is a power of two `>= at_least` (Triton's `dot` wants them `>= 16`)."""
    return n >= at_least and n & (n - 1) == 0


def pow2_block(d: int, cap: int) -> int:
    """The largest power of two `<= cap` that divides `d` (1 if `d` is odd)."""
    b = cap
    while b > 1 and d % b:
        b //= 2
    return b
