"""Models out of a run: `mnemax generate`, `mnemax export --hf` and bits per byte in `eval`.

One checkpoint of the shrunk `tiny` recipe serves every test of the module."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.launch.cli import main
from mnemax.launch.export_hf import llama_mismatch
from mnemax.launch.generate import Sampling, generate_ids, prompt_ids
from mnemax.launch.run_artifacts import restore_newest
from mnemax.layers.decoding import full_forward_logits
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.bits_per_byte import token_byte_lengths
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.data import ByteTokenizer, eval_batches, load_tokenizer
from mnemax.trainer.recipe import recipe_to_dict
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL

SETS = list(SMALL)
ARGS = [arg for item in SETS for arg in ("--set", item)]
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("transformers", "torch"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir whose one checkpoint (step 1) holds random parameters drawn with numpy:
    std 0.3, not init_std's 0.02, so the logits are far from uniform and a layout error in the
    export moves them by O(1); RMSNorm scales 1 + N(0, 0.1^2). (Training or flax's init would
    compile programs for seconds; the tools only read the checkpoint.)"""
    path = tmp_path_factory.mktemp("models_out") / "run"
    recipe = load_recipe("tiny", SETS)
    abstract = build_program(recipe).abstract_state
    rng = np.random.default_rng(0)

    def draw(keys, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return jnp.asarray(1 + 0.1 * noise if keys[-1].key == "scale" else 0.3 * noise)

    state = abstract.replace(
        step=jnp.ones((), jnp.int32),
        params=jax.tree_util.tree_map_with_path(draw, abstract.params),
        opt_state=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract.opt_state),
        model_state=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract.model_state))
    ckpt = Checkpointer(path / "checkpoints", recipe.checkpoint)
    ckpt.save(1, state, {}, recipe_to_dict(recipe))
    ckpt.close()
    return path


def forward(cfg, variables, tokens):
    """mnemax's full forward, jitted (eager: seconds)."""
    return jax.jit(lambda v, t: full_forward_logits(cfg, v, t))(variables, tokens)


def test_generate_greedy_is_deterministic_and_greedy(run_dir, capsys):
    argv = ["generate", "tiny", *ARGS, "--run-dir", str(run_dir), "--prompt", "def f(",
            "--max-tokens", "8", "--greedy"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first

    # The text is the prompt and the decoded ids of the sampling loop, and those ids are an
    # independent greedy choice: each the argmax, over the tokenizer's 257 ids, of the
    # unpadded full forward at the position before it (the model is causal, so one forward
    # over the whole sequence gives each prefix's logits).
    recipe, tok = load_recipe("tiny", SETS), ByteTokenizer()
    model = restore_newest(recipe, run_dir)
    prompt = prompt_ids(tok, "def f(")
    ids = generate_ids(recipe.model, model.variables, prompt,
                       Sampling(max_tokens=8, greedy=True), vocab_limit=tok.vocab_size)
    logits = forward(recipe.model, model.variables, jnp.asarray([[*prompt, *ids]]))
    assert np.argmax(logits[0, len(prompt) - 1:-1, :257], -1).tolist() == ids.tolist()
    ends = np.flatnonzero(ids == tok.eos_id)
    assert first == "def f(" + tok.decode(ids[:ends[0]] if ends.size else ids) + "\n"


def test_export_refuses_models_transformers_has_no_class_for(tmp_path, capsys):
    for name in ("tiny", "dense_125m", "dense_1b"):
        assert llama_mismatch(load_recipe(name).model) is None
    for name, part in [("gdn_h1_tiny", "'gdn'"), ("swa_tiny", "'swa'"), ("nsa_tiny", "'nsa'"),
                       ("moe_tiny", "moe FFN"), ("pkm_tiny", "memory FFN")]:
        assert part in llama_mismatch(load_recipe(name).model), name
    # Refused before any checkpoint is read.
    assert main(["export", "gdn_h1_tiny", "--run-dir", str(tmp_path / "none"),
                 "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "transformers has no class for this model" in err and "'gdn'" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not HAS_TORCH, reason="transformers and torch are installed for Python "
                                          "3.11 only (the `export` extra; a CPU torch wheel)")
def test_export_loads_in_transformers_with_mnemax_logits(run_dir, tmp_path):
    import torch
    import transformers
    from safetensors import safe_open

    out = tmp_path / "hf"
    assert main(["export", "tiny", *ARGS, "--run-dir", str(run_dir), "--hf", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        names = f.keys()  # a safe_open is not iterable
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}

    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 257, (2, 24))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()

    # mnemax in fp32 with the same bf16-rounded params: both sides then compute in fp32 from
    # identical weights and differ only in summation order. A logit passes ~12 reductions of
    # <= 128 terms (d_model 64, mlp 128) of O(1) values: |error| <= 12 x 128 x 2^-24 x O(3)
    # ~ 3e-4 in the worst case (random-walk typical: 1e-5); logits here are O(1) and a layout
    # error (q/k rotation halves, a transposed matrix) moves them by O(1).
    recipe = load_recipe("tiny", SETS)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32),
                          restore_newest(recipe, run_dir).params)
    ours = np.asarray(forward(recipe.model, {"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(theirs, ours, atol=3e-4, rtol=0)
    assert ours.std() > 0.3

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "naïve ∑ café\n\tdef f():"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.eos_token_id == 256 and tok.decode(list(text.encode("utf-8"))) == text


def test_eval_reports_bits_per_byte(run_dir, capsys):
    assert main(["eval", "tiny", *ARGS, "--run-dir", str(run_dir), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    # By hand: every target byte id is one byte, eos none; nats = mean loss x targets.
    targets = np.concatenate([b[:, 1:] for b in eval_batches(load_recipe("tiny", SETS).data,
                                                             2)])
    num_bytes = int(np.sum(targets != ByteTokenizer.eos_id))
    expected = result["eval_loss"] * targets.size / num_bytes / math.log(2)
    assert result["eval_bpb"] == pytest.approx(expected, rel=1e-12)
    assert result["eval_ppl"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-12)


def test_byte_lengths_of_a_byte_level_bpe_spell_the_text(tmp_path):
    """A GPT-2-style byte-level BPE: the table summed over a text's ids is its UTF-8 length,
    with multi-byte characters split across tokens and a special token counted as none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the café's crème brûlée ∑∫ naïve"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = str(tmp_path / "tokenizer.json")
    mnemax_tok = load_tokenizer(spec)
    table = token_byte_lengths(mnemax_tok, spec)
    text = "a crème naïve ∑ — ok"
    ids = mnemax_tok.encode(text)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[mnemax_tok.eos_id] == 0
    assert np.array_equal(token_byte_lengths(ByteTokenizer(), "bytes"),
                          np.r_[np.ones(256, np.int32), 0])
