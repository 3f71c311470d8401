"""Weighted embedding bag: the value read of product-key memory layers.

`out[t] = sum_k weights[t, k] * table[indices[t, k]]` (Lample et al. 2019; Memory+, Berges et al.
2024, whose custom GPU embedding-bag backward this mirrors; PEER's expert read has the same shape).

Shapes and dtypes:
- `table [N, d]` fp32 or bf16; `indices [..., K]` int32 in [0, N); `weights [..., K]` float.
- `out [..., d]` in **table dtype** (Memory+ consumes the memory output in the model's compute
  dtype, which is the dtype the table is cast to), accumulated in fp32 whatever the table dtype.
- Gradients: `d_weights[t, k] = d_out[t] . table[indices[t, k]]` (fp32 accumulation, returned in
  weights dtype) and `d_table[r] = sum_{(t, k): indices[t, k] = r} weights[t, k] * d_out[t]`
  (returned in table dtype). Heads are folded into K by the caller (`[T, H, K] -> [T, H*K]`).

Determinism: d_table never uses float atomics. The (row, token, weight) triples are sorted by row
with a stable sort and each row's contributions are summed in token order, in an order fixed by
the sort (the TPU kernel walks the triples; the GPU kernel reduces fixed-size chunks of them and
then the chunks' boundary pieces, so a hot row's work is spread over many programs); two runs
give bitwise-equal gradients.

`row_dot` (PEER's expert down read, `act[t, j] = table[indices[t, j]] . x[t]`) is the same
kernels rearranged: its forward is d_weights, its gradients the forward and d_table.

Files: `reference.py` (plain jnp forward and backward), `pallas_gpu.py` (Triton kernels),
`pallas_tpu.py` (Mosaic kernels), `op.py` (`embedding_bag`: checks, `dispatch.select`,
`custom_vjp`), `row_dot.py` (`row_dot`). All kernels run under `interpret=True` on CPU in tests.
"""

from mnemax.layers.kernels.embedding_bag.op import AUTO_PLATFORMS, embedding_bag
from mnemax.layers.kernels.embedding_bag.reference import reference, reference_backward
from mnemax.layers.kernels.embedding_bag.row_dot import row_dot, row_dot_reference

__all__ = ["AUTO_PLATFORMS", "embedding_bag", "reference", "reference_backward", "row_dot",
           "row_dot_reference"]
