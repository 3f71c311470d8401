"""Mixture-of-experts FFN: top-k routers, dropless and capacity dispatch, balancing terms."""

from mnemax.layers.moe.config import MoEConfig
from mnemax.layers.moe.layer import MoELayer

__all__ = ["MoEConfig", "MoELayer"]
