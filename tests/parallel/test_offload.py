"""Remat / host-offload policies by checkpoint name, and optimizer-state offload to pinned host.

XLA:CPU has a `pinned_host` memory (the same RAM), so optimizer-state offload really runs here
with host-placed state. Activation offload lowers to the identity on CPU (jax drops in-jit
memory moves there), so its GPU form is checked by exporting the train step for CUDA.
"""

import contextlib
import dataclasses
import io
import re
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.layers.checkpoint_names import ALL_NAMES
from mnemax.parallel.remat import remat_options
from mnemax.trainer.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from mnemax.trainer.setup import build_program, check_host_memory
from tests.helpers.equivalence import assert_same_run, small_run

MESH = "strategy.mesh=data:2,fsdp:4"
SAVED = "attn_out,mlp_hidden"


def _loss(small_recipe, spec, tokens):
    model = small_recipe().model.build(**remat_options(spec))

    def loss(p):
        logits, _ = model.apply(p, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    return loss


def _residual_bytes(loss, *args) -> dict[str, int]:
    """Bytes of the residuals the backward pass keeps, per memory space, from jax's listing
    (lines read like `f32[2,32,64] from ...`, or `f32<host>[...]` for offloaded ones)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, *args)
    total = {"device": 0, "host": 0}
    pattern = r"^([a-z]+)(\d*)(?:<(\w+)>)?\[([\d,]*)\]"
    for kind, bits, space, dims in re.findall(pattern, out.getvalue(), re.M):
        size = 1 if kind == "bool" else int(bits) // 8
        total[space or "device"] += size * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_every_policy_gives_the_gradients_of_none_and_names_set_what_is_saved(small_recipe):
    cfg = small_recipe().model
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    params = jax.jit(cfg.build().init)(jax.random.key(1), tokens)
    specs = ("none", "full", "dots_saveable", f"save_names:{SAVED}", f"offload_names:{SAVED}")
    losses = {spec: _loss(small_recipe, spec, tokens) for spec in specs}
    # One jit (one compile on this slow CPU) holding the five backward passes.
    grads = jax.jit(lambda p: {s: jax.grad(loss)(p) for s, loss in losses.items()})(params)
    for spec in specs[1:]:
        for a, b in zip(jax.tree.leaves(grads[spec]), jax.tree.leaves(grads["none"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=spec)
    residuals = {spec: _residual_bytes(loss, params) for spec, loss in losses.items()}
    device = {spec: r["device"] for spec, r in residuals.items()}
    # save_names keeps what `full` keeps plus exactly the two tagged tensors of each layer:
    # attn_out [layers, batch, time, heads, head_dim] and mlp_hidden [layers, batch, time, mlp].
    tagged = 4 * cfg.num_layers * 2 * 32 * (cfg.num_heads * cfg.dim_per_head + cfg.mlp_dim)
    assert device[f"save_names:{SAVED}"] == device["full"] + tagged
    assert device[f"save_names:{SAVED}"] < device["dots_saveable"] < device["none"]
    # offload_names moves exactly those two to the host memory space, the rest is as `full`.
    assert residuals[f"offload_names:{SAVED}"] == {"device": device["full"], "host": tagged}
    assert all(r["host"] == 0 for spec, r in residuals.items() if "offload" not in spec)


@pytest.mark.parametrize("mixer, names, width", [
    # width: elements per token and layer of the tagged tensors (4 heads x 16, mlp 128).
    ("attention", "attn_q,attn_k,attn_v", 4 * 16 + 2 * 2 * 16),
    ("attention", "mlp_gate,mlp_up", 2 * 128),
    ("gdn", "gdn_qkv,gdn_out", 3 * 4 * 16 + 4 * 16),
])
def test_each_tag_saves_its_tensor(small_recipe, mixer, names, width):
    """Traced only (abstract params): save_names:X keeps exactly X on top of `full`."""
    cfg = dataclasses.replace(small_recipe().model, mixers=(mixer,))
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    params = jax.eval_shape(cfg.build().init, jax.random.key(1), tokens)

    def residuals(spec):
        model = cfg.build(**remat_options(spec))
        loss = lambda p, t: jnp.mean(model.apply(p, t)[0])
        return _residual_bytes(loss, params, tokens)["device"]

    assert residuals(f"save_names:{names}") - residuals("full") == 4 * 2 * 2 * 32 * width


def test_unknown_checkpoint_name_lists_the_known_ones(small_recipe):
    with pytest.raises(ConfigError, match=r"'attn_outt' is not a checkpoint name") as err:
        build_program(small_recipe("strategy.remat=offload_names:attn_outt,mlp_hidden"))
    assert all(name in str(err.value) for name in ALL_NAMES)
    assert "memory_out" in ALL_NAMES and len(set(ALL_NAMES)) == len(ALL_NAMES)


def _export_cuda(program) -> str:
    """StableHLO of the train step lowered for CUDA from this CPU host."""
    state = abstract_with_shardings(program.abstract_state, program.state_shardings)
    data = program.recipe.data
    batch = jax.ShapeDtypeStruct((data.global_batch, data.seq_len + 1), jnp.int32,
                                 sharding=program.batch_sharding)
    with jax.set_mesh(program.mesh):
        exported = jax.export.export(program.train_step.jitted, platforms=["cuda"])(state, batch)
    return exported.mlir_module()


def _placements(text: str, kind: str) -> list[str]:
    """Tensor types moved to memory `kind` by `annotate_device_placement` custom calls."""
    return re.findall(r'annotate_device_placement\(\S+\) \{[^}]*_xla_buffer_placement = "'
                      + kind + r'"\}\} : \(([^)]*)\)', text)


def test_offload_names_lower_to_host_copies_for_cuda(small_recipe):
    saved = _export_cuda(build_program(small_recipe(MESH, f"strategy.remat=save_names:{SAVED}")))
    assert _placements(saved, "pinned_host") == []
    text = _export_cuda(build_program(small_recipe(MESH, f"strategy.remat=offload_names:{SAVED}")))
    # In the scanned block: attn_out [16, 32, 4 heads, 16] and mlp_hidden [16, 32, 128] go to
    # the host after the forward pass, and come back to the device for the backward pass.
    tagged = ["tensor<16x32x4x16xf32>", "tensor<16x32x128xf32>"]
    assert sorted(_placements(text, "pinned_host")) == sorted(tagged)
    assert set(tagged) <= set(_placements(text, "device"))


def test_offloaded_optimizer_state_trains_like_device_state_at_stage0(small_recipe):
    run = small_run(MESH, "strategy.offload_optimizer=true")
    assert_same_run(run, small_run(MESH))
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(run.state.opt_state)}
    assert kinds == {"pinned_host"}
    assert {p.sharding.memory_kind for p in jax.tree.leaves(run.state.params)} == {"device"}
    assert run.program.opt_state_memory_kind == "pinned_host"
    assert build_program(small_recipe(MESH)).opt_state_memory_kind == "device"


def test_offload_at_stage2_with_offloaded_activations_and_checkpoint():
    """ZeRO-2 + optimizer offload + activation offload: same 3 steps as the plain stage-0 run;
    the state survives a checkpoint round trip in its pinned-host, ZeRO-sharded layout."""
    run = small_run(MESH, "strategy.zero_stage=2", "strategy.offload_optimizer=true",
                    f"strategy.remat=offload_names:{SAVED}")
    assert_same_run(run, small_run(MESH))
    state, program = run.state, run.program
    mu = state.opt_state[1].inner_states["dense"].inner_state[0].mu["layers"]["block"]["attn"]["q"]
    assert mu.sharding.memory_kind == "pinned_host"
    assert np.prod(mu.addressable_shards[0].data.shape) * 8 == np.prod(mu.shape)

    with tempfile.TemporaryDirectory() as directory:
        ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
        ckpt.save(3, state, {}, {})
        target = abstract_with_shardings(program.abstract_state, program.state_shardings)
        restored = ckpt.restore(3, target)[0]
        ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def test_optimizer_offload_lowers_to_host_state_for_cuda(small_recipe):
    program = build_program(small_recipe(MESH, "strategy.zero_stage=1",
                                         "strategy.offload_optimizer=true"))
    text = _export_cuda(program)
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    n_opt = len(jax.tree.leaves(program.abstract_state.opt_state))
    # Every optimizer-state leaf is a pinned-host argument and a pinned-host result...
    assert main.count('mhlo.memory_kind = "pinned_host"') == 2 * n_opt
    # ... brought to the device for the update and sent back after it.
    assert len(_placements(text, "device")) >= n_opt
    assert len(_placements(text, "pinned_host")) >= n_opt


def test_optimizer_offload_without_host_memory_is_explained():
    device = types.SimpleNamespace(
        process_index=jax.process_index(), platform="fakeaccel", id=3,
        addressable_memories=lambda: [types.SimpleNamespace(kind="device")])
    mesh = types.SimpleNamespace(devices=np.array([device], dtype=object))
    with pytest.raises(ConfigError, match=r"needs a 'pinned_host' memory, but fakeaccel device 3 "
                                          r"only has device; set strategy.offload_optimizer=false"):
        check_host_memory(mesh)
