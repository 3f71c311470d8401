"""`data.mixture`: several prepared sources with sampling weights.

Syntax: `"DIR_A:0.7,DIR_B:0.3"`, comma-separated `source:weight` pairs, where a source is a
directory written by `mnemax data prepare` or `stdlib`, and a weight a positive number (weights
are normalised to sum to 1; the last `:` of a pair separates the weight, so source paths may
hold `:` but not `,`). The empty string means no mixture: `data.source` alone.
"""

from __future__ import annotations

import math

from mnemax.errors import ConfigError

_EXAMPLE = "data.mixture=data/web:0.7,data/code:0.3"


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """`[(source, weight)]` with weights summing to 1; `[]` for ""."""
    if not text.strip():
        return []
    pairs = []
    for item in text.split(","):
        source, sep, weight = item.strip().rpartition(":")
        try:
            value = float(weight) if sep and source else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"data.mixture item {item.strip()!r} is not SOURCE:WEIGHT with a positive "
                f"weight: write e.g. {_EXAMPLE}."
            )
        pairs.append((source, value))
    names = [s for s, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"data.mixture={text!r} names a source twice: list each source once with its "
            "total weight."
        )
    total = sum(w for _, w in pairs)
    return [(s, w / total) for s, w in pairs]
