"""Cross entropy and z-loss against a float64 NumPy reference, values and gradients, and the
lowering that keeps the TPU step estimate down (no gather or scatter over the logits)."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from mnemax.layers.factored_logits import FactoredLogits, sequence_chunk
from mnemax.trainer.loss import cross_entropy

BATCH, TIME, VOCAB = 3, 5, 37


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Logits up to ~|12| with a spread like a trained model's; every id of the vocabulary can be
    # a target, the first and last included.
    logits = (rng.standard_normal((BATCH, TIME, VOCAB)) * 4).astype(np.float32)
    targets = rng.integers(0, VOCAB, (BATCH, TIME)).astype(np.int32)
    targets[0, 0], targets[0, 1] = 0, VOCAB - 1
    return logits, targets


def _reference(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float, np.ndarray]:
    """float64: mean(lse - logit[target]), mean(lse^2), d(ce)/d(logits) = (softmax - onehot)/N."""
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    target = np.take_along_axis(x, targets[..., None], -1)[..., 0]
    onehot = np.eye(VOCAB)[targets]
    grad = (np.exp(x - lse[..., None]) - onehot) / targets.size
    return float(np.mean(lse - target)), float(np.mean(lse**2)), grad


def test_cross_entropy_and_its_gradient_match_float64():
    """Tolerances: fp32 rounds each logit difference x - max (|x| <= ~16) to 2^-24 * 16 ~ 1e-6
    and the log-sum-exp over 37 terms adds a few ulps of lse (~1e-6 at |lse| <= 20), so the
    mean cross entropy is within ~2e-6 of float64 and the z-loss (lse^2 ~ 400) within
    2 * lse * 2e-6 ~ 1e-4 relative 2.5e-7; each softmax probability p = exp(x - lse) carries
    the same ~2e-6 relative error, so a gradient entry (p - onehot) / N is within ~2e-6 / N.
    Tolerances are 2-5x those bounds. A wrong target (off by one id) moves the loss by ~4."""
    logits, targets = _case()
    ce_ref, z_ref, grad_ref = _reference(logits, targets)
    ce, z = jax.jit(cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(ce), ce_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(z), z_ref, rtol=1e-6, atol=0)
    grad = jax.jit(jax.grad(lambda x: cross_entropy(x, jnp.asarray(targets))[0]))(
        jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(grad), grad_ref, rtol=0, atol=5e-6 / targets.size)


def test_bf16_logits_are_upcast_before_the_softmax():
    """bf16 logits give the float64 loss of their own (exactly representable) values: the
    log-sum-exp runs in fp32, not in bf16 (whose 8-bit mantissa would be off by ~0.05)."""
    logits, targets = _case(1)
    low = jnp.asarray(logits, jnp.bfloat16)
    ce_ref, _, _ = _reference(np.asarray(low.astype(jnp.float32)), targets)
    ce, _ = cross_entropy(low, jnp.asarray(targets))
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(float(ce), ce_ref, rtol=0, atol=1e-5)


def test_the_target_logit_is_picked_without_a_gather_or_scatter():
    """On TPU a gather of the target logits (and the scatter of its gradient) over the whole
    fp32 logits cost ~12 GiB of memory traffic per chip for dense_1b's batch; the one-hot
    select fuses into the log-sum-exp's pass instead."""
    logits, targets = _case()
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: cross_entropy(x, jnp.asarray(targets))[0]))(
        jnp.asarray(logits))
    primitives = {str(eqn.primitive) for eqn in jaxpr.jaxpr.eqns}
    assert not {"gather", "scatter", "scatter-add", "scatter_add"} & primitives, primitives


def _factored_case(seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((BATCH, 12, 8)).astype(np.float32)
    unembed = (rng.standard_normal((8, VOCAB)) * 1.5).astype(np.float32)
    targets = rng.integers(0, VOCAB, (BATCH, 12)).astype(np.int32)
    return hidden, unembed, targets


# 3 sequences x 4 positions x 37 ids = 444 <= 450 < 3 x 6 x 37: chunks of 4 of the 12 positions.
CHUNK_LIMIT = 450


def test_sequence_chunk_is_the_largest_divisor_under_the_limit():
    assert sequence_chunk(BATCH, 12, VOCAB, CHUNK_LIMIT) == 4
    assert sequence_chunk(BATCH, 12, VOCAB, 10**9) == 12
    assert sequence_chunk(BATCH, 7, VOCAB, CHUNK_LIMIT) == 1  # a prime length: one at a time
    assert sequence_chunk(BATCH, 12, VOCAB, 1) == 1


def test_factored_logits_loss_and_gradients_match_float64():
    """Three chunks of four positions against float64 over the whole logits. The logits are
    8-term fp32 dot products of values ~|3| x ~|4| (error ~8 * 2^-24 * 12 ~ 6e-6), so the loss
    is within ~1e-5 of float64 besides the log-sum-exp's ~2e-6 (see above); the gradients
    `dL/dh = (p - onehot) W^T / N` and `dL/dW = h^T (p - onehot) / N` sum 37 and 36 terms of
    ~2e-6 / N relative error each: within ~1e-4 / N. Tolerances ~3x that. Each gradient also
    fails if a chunk is dropped, counted twice, or meets another chunk's targets."""
    hidden, unembed, targets = _factored_case()
    x64 = hidden.astype(np.float64) @ unembed.astype(np.float64)
    ce_ref, z_ref, dlogits = _reference(x64, targets)
    dh_ref = dlogits @ unembed.astype(np.float64).T
    dw_ref = np.einsum("bte,btv->ev", hidden.astype(np.float64), dlogits)

    def loss(h, w):
        return FactoredLogits(h, w).cross_entropy(jnp.asarray(targets), CHUNK_LIMIT)

    (ce, z), (dh, dw) = jax.jit(lambda h, w: (loss(h, w), jax.grad(
        lambda h, w: loss(h, w)[0], argnums=(0, 1))(h, w)))(jnp.asarray(hidden),
                                                             jnp.asarray(unembed))
    n = targets.size
    np.testing.assert_allclose(float(ce), ce_ref, rtol=0, atol=3e-5)
    np.testing.assert_allclose(float(z), z_ref, rtol=3e-6, atol=0)
    np.testing.assert_allclose(np.asarray(dh), dh_ref, rtol=0, atol=3e-4 / n)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=0, atol=3e-4 / n)
    # The trainer's entry point takes the factored form too.
    ce_trainer, _ = cross_entropy(FactoredLogits(jnp.asarray(hidden), jnp.asarray(unembed)),
                                  jnp.asarray(targets))
    np.testing.assert_allclose(float(ce_trainer), ce_ref, rtol=0, atol=3e-5)


def _largest_array(jaxpr) -> int:
    """The most elements of any value in a jaxpr, sub-jaxprs (scan, checkpoint) included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in [*eqn.invars, *eqn.outvars]:
            shape = getattr(var.aval, "shape", ())
            largest = max(largest, int(np.prod(shape)) if shape else 1)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_array(sub))
    return largest


def test_factored_loss_never_holds_the_whole_logits():
    """Forward and backward: no value anywhere in the program is as large as the `[b, t, v]`
    logits (a version that materializes them and then chunks would pass the numbers above)."""
    hidden, unembed, targets = _factored_case()
    grad = jax.grad(lambda h, w: FactoredLogits(h, w).cross_entropy(
        jnp.asarray(targets), CHUNK_LIMIT)[0], argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad)(jnp.asarray(hidden), jnp.asarray(unembed))
    assert _largest_array(jaxpr.jaxpr) <= BATCH * 4 * VOCAB < BATCH * 12 * VOCAB
