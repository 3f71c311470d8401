"""Exact top-k over product keys (Lample et al. 2019, "Large Memory Layers with Product Keys").

The n*n keys are pairs (i1, i2) of sub-keys `C1[i1]`, `C2[i2]`; the score of key (i1, i2) is
`s1[i1] + s2[i2]` with `s1 = q1 . C1`, `s2 = q2 . C2` (fp32), and its flat index is
`i1 * n + i2`. Order: higher score first, and among equal scores the smaller flat index first
(what `jax.lax.top_k` does over the brute-force `[n*n]` score vector).

Files: `reference.py` (the exact search in plain jnp, the only backend), `op.py`
(`product_key_topk`: checks and `dispatch.select`, so a kernel can be added beside the others).
"""

from mnemax.layers.kernels.product_keys.op import product_key_topk
from mnemax.layers.kernels.product_keys.reference import reference

__all__ = ["product_key_topk", "reference"]
