"""The gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025).

The conventions are those of fla's `chunk_gated_delta_rule` so results compare one to one:
`q, k: [batch, time, heads, d_k]`, `v: [batch, time, heads, d_v]`, `g, beta: [batch, time,
heads]`, states `[batch, heads, d_k, d_v]` in fp32, default `scale = d_k ** -0.5`. The op does not
normalise q and k; the layer does.

Files: `reference.py` (the recurrent form: the ground truth and the decoding step), `chunk.py`
(the chunkwise-parallel form, with the backend choice for its scan over chunks), `pallas_gpu.py`
(the Triton kernel for that scan, backward by autodiff of the XLA scan), `op.py`
(`gated_delta_rule`: `form` picks the algorithm, `impl` the backend).
"""

from mnemax.layers.kernels.gated_delta.chunk import AUTO_PLATFORMS, chunk_gated_delta_rule
from mnemax.layers.kernels.gated_delta.op import (
    CONFIG_IMPLS,
    FORMS,
    Form,
    gated_delta_rule,
    impl_and_form,
)
from mnemax.layers.kernels.gated_delta.reference import gated_delta_step, reference

__all__ = ["AUTO_PLATFORMS", "CONFIG_IMPLS", "FORMS", "Form", "chunk_gated_delta_rule",
           "gated_delta_rule", "gated_delta_step", "impl_and_form", "reference"]
