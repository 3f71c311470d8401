"""Block-sparse attention: each query group attends to the key blocks it lists, with a per-token
mask over the listed slots, causal and optionally windowed inside blocks, GQA.

The one op under sliding-window attention, MoBA (Lu et al. 2025, "MoBA: Mixture of Block
Attention for Long-Context LLMs") and NSA's selected branch (Yuan et al. 2025, "Native Sparse
Attention"): a layer lists, per (query group, head), the union of its tokens' chosen key blocks,
and each token's own choice is its row of the slot mask. Semantics: `masked_reference.py`.

Files: `masked_reference.py` (the definition, dense O(T^2); tests only), `blocks.py` (the
gathered-block XLA path, O(T * L * B)), `pallas_gpu.py` (Triton kernels; `gpu_layout.py` their
inverse lists and GQA packing), `pallas_tpu.py` (Mosaic kernels), `op.py`
(`block_sparse_attention`: checks, `dispatch.select`).
"""

from mnemax.layers.kernels.block_sparse_attention.masked_reference import masked_attention
from mnemax.layers.kernels.block_sparse_attention.op import AUTO_PLATFORMS, block_sparse_attention

__all__ = ["AUTO_PLATFORMS", "block_sparse_attention", "masked_attention"]
