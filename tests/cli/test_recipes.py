"""Recipes: resolution, typed overrides, errors that name the problem, `mnemax show`."""

import json

import pytest

from mnemax.errors import ConfigError
from mnemax.launch.cli import main
from mnemax.recipes.registry import builtin_names, load_recipe


def test_builtin_recipes_resolve_and_tiny_is_small():
    assert {"tiny", "dense_125m", "dense_1b"} <= set(builtin_names())
    tiny = load_recipe("tiny")
    assert 1_000_000 <= tiny.model.param_count() <= 5_000_000
    assert 128 <= tiny.data.seq_len <= 256
    assert 0.9e9 <= load_recipe("dense_1b").model.param_count() <= 1.3e9
    assert 0.1e9 <= load_recipe("dense_125m").model.param_count() <= 0.16e9


def test_overrides_are_typed():
    r = load_recipe("tiny", ["model.num_layers=6", "optimizer.learning_rate=1e-3",
                             "model.tie_embeddings=true", "strategy.mesh=data:2,fsdp:4",
                             "strategy.zero_stage=3", "model.num_kv_heads=2",
                             "schedule.decay_steps=none"])
    assert r.model.num_layers == 6 and isinstance(r.model.num_layers, int)
    assert r.optimizer.learning_rate == 1e-3
    assert r.model.tie_embeddings is True
    assert r.strategy.mesh == "data:2,fsdp:4" and r.strategy.zero_stage == 3
    assert r.model.num_kv_heads == 2 and r.schedule.decay_steps is None


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown override key 'model\.num_layrs'.*did you mean "
                                          r"model\.num_layers\?"):
        load_recipe("tiny", ["model.num_layrs=3"])


def test_badly_typed_value_is_named():
    with pytest.raises(ConfigError, match=r"run\.steps='many': expected an integer"):
        load_recipe("tiny", ["run.steps=many"])


def test_bad_mesh_and_stage_are_explained():
    with pytest.raises(ConfigError, match="'dta:2' is not 'axis:size'"):
        load_recipe("tiny", ["strategy.mesh=dta:2"])
    with pytest.raises(ConfigError, match="zero_stage=5 is not available"):
        load_recipe("tiny", ["strategy.zero_stage=5"])


def test_unknown_recipe_suggests_a_builtin():
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_recipe("tinyy")


def test_recipe_from_a_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "import dataclasses\n"
        "from mnemax.recipes.tiny import recipe as base\n"
        "def recipe():\n"
        "    r = base()\n"
        "    return dataclasses.replace(r, name='mine', model=dataclasses.replace(r.model, "
        "num_layers=2))\n"
    )
    r = load_recipe(str(path), ["run.steps=7"])
    assert r.name == "mine" and r.model.num_layers == 2 and r.run.steps == 7


def test_show_json_reports_size_flops_and_memory(capsys):
    assert main(["show", "tiny", "--json", "--set", "strategy.mesh=data:2,fsdp:4",
                 "--set", "strategy.zero_stage=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    recipe = load_recipe("tiny")
    assert out["params"] == recipe.model.param_count()
    assert out["flops_per_token"] == pytest.approx(recipe.model.flops_per_token(128))
    mem = out["memory_per_device"]
    # fp32 params sharded 4 ways over fsdp (norm scales and all); Adam's two fp32 moments over
    # all 8 data-parallel devices (data x fsdp).
    assert mem["params_bytes"] == pytest.approx(4 * out["params"] / 4, rel=0.01)
    assert mem["opt_state_bytes"] == pytest.approx(8 * out["params"] / 8, rel=0.01)
    assert out["mesh"]["data"] == 2 and out["mesh"]["fsdp"] == 4


def test_cli_errors_are_one_paragraph_without_traceback(capsys):
    assert main(["show", "tiny", "--set", "model.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown override key 'model.nope'")
    assert "Traceback" not in err and err.count("\n") == 1
