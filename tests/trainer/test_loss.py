"""Cross entropy and z-loss against a float64 NumPy reference, values and gradients, and the
lowering that keeps the TPU step estimate down (no gather or scatter over the logits)."""

import jax
import jax.numpy as jnp
import numpy as np

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
