"""Typed choices (issue 11, item 5): string fields with a fixed set of values are `Literal`s,
`--set` refuses other values naming the full key and the choices, and configs built in Python
refuse them too (Python does not enforce `Literal`)."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Literal

import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError, check_choices
from mnemax.layers import gated_delta
from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels import gated_delta as gated_delta_kernel
from mnemax.layers.memory import MemoryConfig
from mnemax.layers.memory import config as memory_config
from mnemax.parallel import strategy
from mnemax.recipes.registry import load_recipe
from mnemax.trainer import compressed_adam, optimizer, setup
from mnemax.trainer import config as run_config

# Recipes whose trees hold every config section: pkm_tiny has a memory, gdn_tiny a gated_delta.
RECIPES = ("pkm_tiny", "gdn_tiny")
# The fields that must stay typed; a field turned back into `str` drops out of the walk below.
EXPECTED = {
    "model.memory.variant", "model.memory.query_norm", "model.memory.mode",
    "model.memory.peer_activation", "model.memory.init", "model.memory.impl",
    "model.gated_delta.impl", "strategy.memory_sharding", "optimizer.name",
    "optimizer.moments_dtype", "schedule.decay", "run.compute_dtype", "run.nan_policy",
}


def literal_fields(node: object, prefix: str = "") -> dict[str, tuple]:
    """`{override path: choices}` of the `Literal` fields in the dataclass tree `node`."""
    out = {}
    hints = typing.get_type_hints(type(node))
    for field in dataclasses.fields(node):
        value, path = getattr(node, field.name), prefix + field.name
        if dataclasses.is_dataclass(value):
            out.update(literal_fields(value, path + "."))
        elif typing.get_origin(hints[field.name]) is Literal:
            out[path] = typing.get_args(hints[field.name])
    return out


CASES = [(name, path, choices) for name in RECIPES
         for path, choices in literal_fields(load_recipe(name)).items()]


def test_every_expected_field_is_a_literal():
    assert {path for _, path, _ in CASES} >= EXPECTED


@pytest.mark.parametrize(("name", "path", "choices"), CASES, ids=[f"{n}:{p}" for n, p, _ in CASES])
def test_set_refuses_a_value_outside_the_choices(name, path, choices):
    with pytest.raises(ConfigError) as err:
        load_recipe(name, [f"{path}=bogus"])
    message = str(err.value)
    assert message.startswith(f"{path}='bogus' is unknown; choose one of "), message
    assert message.endswith(", ".join(choices)), message


@pytest.mark.parametrize(("name", "path", "choices"), CASES, ids=[f"{n}:{p}" for n, p, _ in CASES])
def test_each_choice_is_set_and_validates(name, path, choices):
    for choice in choices:
        recipe = load_recipe(name, [f"{path}={choice}"])
        assert functools.reduce(getattr, path.split("."), recipe) == choice
        recipe.model.validate()
        schedule = optimizer.make_schedule(recipe.optimizer, recipe.schedule, recipe.run.steps)
        tx = optimizer.make_optimizer(recipe.optimizer, schedule, {"w": "matrix"})
        tx.init({"w": jnp.zeros((4,))})
        assert recipe.run.compute_dtype in setup.COMPUTE_DTYPES
        assert np.isfinite(float(schedule(recipe.run.steps // 2)))


# (config class, field, the Literal alias, the tuple of allowed values the code checks against)
ALIASES = [
    (MemoryConfig, "variant", memory_config.MemoryVariant, memory_config.VARIANTS),
    (MemoryConfig, "query_norm", memory_config.QueryNorm, memory_config.QUERY_NORMS),
    (MemoryConfig, "mode", memory_config.MemoryMode, memory_config.MODES),
    (MemoryConfig, "peer_activation", memory_config.PeerActivation,
     memory_config.PEER_ACTIVATIONS),
    (MemoryConfig, "init", memory_config.MemoryInit, memory_config.INITS),
    (MemoryConfig, "impl", dispatch.Impl, dispatch.IMPLS),
    (gated_delta.GatedDeltaConfig, "impl", gated_delta.GatedDeltaImpl,
     tuple(gated_delta_kernel.CONFIG_IMPLS)),
    (strategy.Strategy, "memory_sharding", strategy.MemorySharding, strategy.MEMORY_SHARDINGS),
    (optimizer.OptimizerConfig, "name", optimizer.OptimizerName, optimizer.OPTIMIZERS),
    (optimizer.OptimizerConfig, "moments_dtype", optimizer.MomentsDtype,
     tuple(compressed_adam.MOMENT_DTYPES)),
    (optimizer.ScheduleConfig, "decay", optimizer.ScheduleDecay, optimizer.DECAYS),
    (run_config.RunConfig, "compute_dtype", run_config.ComputeDtype, tuple(setup.COMPUTE_DTYPES)),
    (run_config.RunConfig, "nan_policy", run_config.NanPolicy, setup.NAN_POLICIES),
]


@pytest.mark.parametrize(("cls", "field", "alias", "allowed"), ALIASES,
                         ids=[f"{c.__name__}.{f}" for c, f, _, _ in ALIASES])
def test_literal_choices_equal_the_tuple_the_code_uses(cls, field, alias, allowed):
    assert typing.get_type_hints(cls)[field] == alias
    assert sorted(typing.get_args(alias)) == sorted(allowed)  # the order only shows in messages


def test_python_construction_with_a_bad_choice_is_a_config_error():
    bad = [
        (lambda: MemoryConfig(variant="pkn"), "model.memory.variant='pkn'"),
        (lambda: gated_delta.GatedDeltaConfig(impl="triton"), "model.gated_delta.impl='triton'"),
        (lambda: strategy.Strategy(memory_sharding="cols"), "strategy.memory_sharding='cols'"),
        (lambda: dataclasses.replace(optimizer.OptimizerConfig(), moments_dtype="fp8"),
         "optimizer.moments_dtype='fp8'"),
        (lambda: optimizer.ScheduleConfig(decay="step"), "schedule.decay='step'"),
        (lambda: run_config.RunConfig(nan_policy="stop"), "run.nan_policy='stop'"),
    ]
    for build, key in bad:
        with pytest.raises(ConfigError, match=f"^{re.escape(key)} is unknown; choose one of "):
            build()


def test_validate_names_the_full_override_path():
    with pytest.raises(ConfigError, match=r"^model\.memory\.topk=9 exceeds the 8 sub-keys per "
                                          r"half; lower topk or raise model\.memory\.num_rows"):
        MemoryConfig(num_rows=64, topk=9).validate(d_model=32, num_layers=2)
    with pytest.raises(ConfigError, match=r"^model\.memory\.topk=200 exceeds the 128 sub-keys"):
        load_recipe("pkm_tiny", ["model.memory.topk=200"]).model.build()
    with pytest.raises(ConfigError, match=r"^model\.gated_delta\.num_value_heads=3 is not a "
                                          r"multiple of model\.gated_delta\.num_heads=2"):
        gated_delta.GatedDeltaConfig(num_heads=2, num_value_heads=3).validate()



def test_memory_layers_outside_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"^model\.memory\.layers=\(1, 2\) names blocks \[2\] "
                                          r"outside the model's 2 layers"):
        load_recipe("pkm_tiny", ["model.memory.layers=1,2", "model.num_layers=2"]).model.build()
    with pytest.raises(ConfigError, match=r"^model\.memory\.layers=\(2,\) names blocks \[2\]"):
        load_recipe("pkm_tiny", ["model.memory.layers=2", "model.num_layers=2"]).model.build()


Mixer = Literal["attention", "gdn"]


@dataclasses.dataclass(frozen=True)
class _Blocks:
    mixers: tuple[Mixer, ...] = ()
    first: Mixer = "attention"

    def __post_init__(self) -> None:
        check_choices(self, "model")


def test_check_choices_covers_tuples_of_literals():
    _Blocks(mixers=("gdn", "attention"), first="gdn")
    with pytest.raises(ConfigError, match=r"^model\.mixers='swa' is unknown; choose one of "
                                          r"attention, gdn$"):
        _Blocks(mixers=("gdn", "swa"))
