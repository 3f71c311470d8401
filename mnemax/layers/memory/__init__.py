"""Memory layers: product keys, Memory+, UltraMem(V2), PEER."""

from mnemax.layers.memory.config import MemoryConfig
from mnemax.layers.memory.layer import MemoryLayer, memory_flops_per_token, memory_param_count

__all__ = ["MemoryConfig", "MemoryLayer", "memory_flops_per_token", "memory_param_count"]
