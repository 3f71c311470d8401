"""`mnemax export --hf`: a dense Llama-style checkpoint as a Hugging Face `LlamaForCausalLM`.

Writes `model.safetensors` (bf16), `config.json` and the tokenizer files. The layouts agree
without permutation: mnemax's RoPE rotates the pairs (x[i], x[i + d/2]) by position x
theta^(-2i/d) (`mnemax.layers.rope`), which is transformers' `rotate_half` with its default
inverse frequencies, so q and k need no interleaving fix (only Meta's original checkpoints
do); attention scales by head_dim^-0.5 in both; RMSNorm is x / sqrt(mean(x^2) + eps) * w in
fp32 in both; there is no logit soft-cap or scaling. What changes is the matrix layout: flax
kernels are `[in, out]` (q: `[embed, heads, head_dim]`), torch's `Linear.weight` is
`[out, in]`.

A byte-level recipe (`data.tokenizer=bytes`) gets a `tokenizer.json` built with `tokenizers`
that encodes as mnemax's `ByteTokenizer`: ids 0..255 are the UTF-8 bytes (a byte-level BPE
with no merges over GPT-2's byte alphabet), id 256 the eos `<|endoftext|>`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np
from etils import epath

from mnemax.errors import ConfigError
from mnemax.layers.components.attention import AttentionMixer
from mnemax.layers.components.swiglu import SwiGLUFFN
from mnemax.layers.decoding import block_variables
from mnemax.layers.transformer import TransformerConfig
from mnemax.trainer.bits_per_byte import bytes_to_unicode
from mnemax.trainer.recipe import Recipe

BYTE_EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_mismatch(cfg: TransformerConfig) -> str | None:
    """Why `LlamaForCausalLM` cannot hold this model (None: it can). Llama's block is full
    causal attention (GQA, RoPE) then one SwiGLU MLP, each after an RMSNorm."""
    for layer in range(cfg.num_layers):
        mixer = cfg.mixer_component(layer)
        if not isinstance(mixer, AttentionMixer) or mixer.window is not None:
            return (f"block {layer}'s mixer is {cfg.mixer(layer)!r} (model.mixers), and a Llama "
                    "block has full causal attention only")
        ffns = cfg.ffn_components(layer)
        others = [type(f).name for f in ffns if not isinstance(f, SwiGLUFFN)]
        if others:
            return (f"block {layer} has the {', '.join(others)} FFN (model.memory / model.moe), "
                    "and a Llama block has one dense SwiGLU MLP")
        if cfg.block_context(layer).ffn_hidden_dim != cfg.hidden_dim:
            return f"block {layer}'s SwiGLU width differs from model.mlp_dim={cfg.hidden_dim}"
    if cfg.shared_params():
        return "it has parameters shared across blocks"
    return None


def check_exportable(cfg: TransformerConfig, name: str) -> None:
    """Raises ConfigError saying why transformers has no class for this model."""
    reason = llama_mismatch(cfg)
    if reason is not None:
        raise ConfigError(
            f"cannot export {name} to Hugging Face: transformers has no class for this model "
            f"({reason}). `mnemax export --hf` writes LlamaForCausalLM, which holds dense "
            "Llama-style recipes only (tiny, dense_125m, dense_1b); sample from this one with "
            "`mnemax generate` and score it with `mnemax eval`")


def llama_config(cfg: TransformerConfig, *, max_positions: int, bos_id: int | None,
                 eos_id: int) -> dict[str, Any]:
    """`config.json` of `LlamaForCausalLM` for `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.q_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }


def llama_tensors(cfg: TransformerConfig, params: Any) -> dict[str, np.ndarray]:
    """transformers' state dict (names and `[out, in]` layouts) from mnemax params, fp32."""
    d = cfg.d_model
    out = {"model.embed_tokens.weight": np.asarray(params["embedding"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["unembed"], np.float32).T
    for i in range(cfg.num_layers):
        block = block_variables(cfg, {"params": params}, i)["params"]
        attn, mlp = block["attn"], block["mlp"]
        prefix = f"model.layers.{i}."
        for name in ("q", "k", "v"):
            w = np.asarray(attn[name], np.float32)  # [embed, heads, head_dim]
            out[f"{prefix}self_attn.{name}_proj.weight"] = w.reshape(d, -1).T
        out[f"{prefix}self_attn.o_proj.weight"] = np.asarray(attn["o"], np.float32).reshape(
            -1, d).T
        for name in ("gate", "up", "down"):
            out[f"{prefix}mlp.{name}_proj.weight"] = np.asarray(mlp[name], np.float32).T
        out[f"{prefix}input_layernorm.weight"] = np.asarray(block["attn_norm"]["scale"],
                                                            np.float32)
        out[f"{prefix}post_attention_layernorm.weight"] = np.asarray(
            block["mlp_norm"]["scale"], np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_bf16(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """Writes `tensors` rounded to bf16 (round to nearest even) as safetensors."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def write_byte_tokenizer(out: pathlib.Path, max_positions: int) -> None:
    """tokenizer.json (+ its config files) encoding text as mnemax's `ByteTokenizer` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS_TOKEN])  # id 256, the ByteTokenizer's eos
    if tok.token_to_id(BYTE_EOS_TOKEN) != 256:
        raise AssertionError("the byte tokenizer's eos must be id 256")
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BYTE_EOS_TOKEN,
              "bos_token": None, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": max_positions, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": BYTE_EOS_TOKEN}, indent=2) + "\n")


def export_hf(recipe: Recipe, run_dir: epath.PathLike, out: str | pathlib.Path) -> pathlib.Path:
    """Writes the newest checkpoint in `run_dir` to the directory `out` (created; files
    already there are replaced) and returns it."""
    from mnemax.launch.run_artifacts import restore_newest
    from mnemax.trainer.run_tokenizer import run_tokenizer, tokenizer_spec

    check_exportable(recipe.model, recipe.name)
    tokenizer = run_tokenizer(recipe.data)
    if recipe.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} ids; the checkpoint cannot be "
                          "this recipe's")
    model = restore_newest(recipe, run_dir)
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_bf16(llama_tensors(recipe.model, model.params), out / "model.safetensors")
    max_positions = recipe.data.seq_len
    config = llama_config(recipe.model, max_positions=max_positions,
                          bos_id=getattr(tokenizer, "bos_id", None), eos_id=tokenizer.eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    spec = tokenizer_spec(recipe.data)
    if spec == "bytes":
        write_byte_tokenizer(out, max_positions)
    else:
        source = pathlib.Path(spec).expanduser()
        for name in TOKENIZER_FILES:
            found = source if name == "tokenizer.json" else source.parent / name
            if found.is_file():
                shutil.copyfile(found, out / name)
    return out
