"""Sharded training equals unsharded training; bad meshes fail early with clear messages."""

import jax
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.trainer.setup import build_program
from tests.helpers.equivalence import (
    assert_grads_close,
    assert_same_run,
    gaps,
    initial_params,
    small_run,
)


def test_data_and_fsdp_meshes_match_one_device():
    base = small_run(one_device=True)
    for overrides in (("strategy.mesh=data:8",),
                      ("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")):
        run = small_run(*overrides)
        assert_same_run(run, base)
    # ZeRO-3 really shards: the q projection's embed dim is split 4 ways over fsdp.
    q = run.state.params["layers"]["block"]["attn"]["q"]
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 4
    # The runs start from one-device parameters; the sharded init gives them bit for bit.
    sharded = jax.device_get(run.program.init(jax.random.key(0)).params)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(initial_params(run.program.recipe)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_factored_logits_loss_in_chunks_on_fsdp_matches_one_device(monkeypatch):
    """The model hands the trainer `FactoredLogits` and the loss runs over 4 chunks of 8
    positions (the per-device limit is lowered so the small model chunks), sharded with
    ZeRO-3: the same run as whole logits on one device (the chunks only reorder the loss's
    additions)."""
    import mnemax.layers.factored_logits as factored

    base = small_run(one_device=True)
    batch, seq_len = base.program.recipe.data.global_batch, base.program.recipe.data.seq_len
    vocab = base.program.recipe.model.vocab_size
    per_device = batch // 8  # the batch is split over data x fsdp = 8 devices
    monkeypatch.setattr(factored, "CHUNK_LOGIT_ELEMENTS", per_device * 8 * vocab)
    assert factored.sequence_chunk(per_device, seq_len, vocab,
                                   factored.CHUNK_LOGIT_ELEMENTS) == 8
    run = small_run("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3",
                    "model.factored_logits=true")
    assert_same_run(run, base)


def test_gradient_accumulation_matches_one_big_batch():
    # Both programs share one loss_fn, so their `grads` agree trivially; the accumulation
    # (sum of micro-batch gradients / grad_accum) is checked by the step's own grad_norm.
    one = small_run("strategy.mesh=data:8")
    accum = small_run("strategy.mesh=data:8", "run.grad_accum=2")
    assert_same_run(accum, one)


# bfloat16 compute, float32 master weights and gradients. bf16 keeps 8 significant bits, so a
# rounding is off by at most 2^-9 relative. Both runs round the same operations, but where an
# operation's float32 input was summed in another order (the sharded run reduces a weight
# gradient over 64 tokens per device and then across 8 devices; one device over all 512) the two
# roundings can land on neighbouring bf16 values, 2^-8 apart. A gradient ends the deepest chain
# of roundings: the forward and backward pass through embedding, 2 layers of (norm, q, k, v,
# scores, softmax, weighted values, output projection, norm, gate, up, SwiGLU, down) and final
# norm and logits, ~28 ops each way: D = 56 in series. Independent differences add like a random
# walk: sqrt(D) 2^-8 = 2.9% of a gradient's scale (its leaf's largest element, as for float32);
# the gradient norm is a sum over all elements, so it moves no more. A token's loss is ~28 ops
# deep and the loss is the mean over 512 tokens with independent errors: sqrt(28) 2^-8 /
# sqrt(512) = 9.1e-4 relative. Tolerances are twice these estimates; a gradient 2x or 1/8 too
# large is off by 100% or 88%. Only the first two steps are compared: both run at the initial
# parameters (warmup starts at lr 0). Later steps are not: a bf16-sized error can flip the sign
# of a near-zero gradient element, and Adam then moves that parameter by 2 lr either way.
BF16_GRAD_RTOL = 2 * 56**0.5 * 2.0**-8
BF16_LOSS_RTOL = 2 * 28**0.5 * 2.0**-8 / 512**0.5


def test_bfloat16_compute_on_data_and_fsdp_matches_one_device():
    bf16 = "run.compute_dtype=bfloat16"
    base = small_run(bf16, one_device=True)
    run = small_run(bf16, "strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")
    print(gaps(run, base))
    np.testing.assert_allclose(run.losses[:2], base.losses[:2], rtol=BF16_LOSS_RTOL,
                               err_msg="loss")
    np.testing.assert_allclose(run.grad_norms[:2], base.grad_norms[:2], rtol=BF16_GRAD_RTOL,
                               err_msg="grad_norm")
    assert_grads_close(run.grads, base.grads, BF16_GRAD_RTOL)
    # The matmuls really run in bfloat16 (else this would be the float32 test above).
    program = run.program
    inputs = jax.ShapeDtypeStruct((16, 32), np.int32)
    with jax.set_mesh(program.mesh):
        jaxpr = str(jax.make_jaxpr(program.loss_fn)(program.abstract_state.params, inputs, inputs))
    assert any(":bf16[" in line for line in jaxpr.splitlines() if "dot_general" in line)


def test_indivisible_parameter_dimension_names_both_numbers(small_recipe):
    recipe = small_recipe("model.d_model=60", "model.head_dim=16",
                          "strategy.mesh=fsdp:8", "strategy.zero_stage=3")
    with pytest.raises(ConfigError, match=r"size 60 is not divisible by 8 \(mesh axes fsdp\)"):
        build_program(recipe)


def test_indivisible_batch_names_both_numbers(small_recipe):
    with pytest.raises(ConfigError, match=r"12 sequences .* not divisible by the 8 data-parallel"):
        build_program(small_recipe("data.global_batch=12", "strategy.mesh=data:8"))


def test_mesh_that_does_not_match_device_count(small_recipe):
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are present"):
        build_program(small_recipe("strategy.mesh=data:2,fsdp:3"))
