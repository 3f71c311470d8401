"""User-facing errors.

Every error a user can cause (a bad recipe key, a mesh that does not divide a shape, a missing
data directory, a corrupt checkpoint) is raised as a subclass of `MnemaxError` with a message that
names the bad value, the rule it broke and the fix. The CLI prints these as one paragraph,
without a traceback; anything else is a bug and keeps its traceback.

Config fields with a fixed set of values are typed `Literal[...]`; `check_choices` enforces them
when a config is built in Python, with the same message as a bad `--set` (`unknown_choice`).
"""

import dataclasses
import functools
import typing


class MnemaxError(Exception):
    """Base class of errors caused by user input, shown without a traceback."""


class ConfigError(MnemaxError):
    """A recipe, an override or a strategy is invalid."""


class DataError(MnemaxError):
    """A data source is missing, malformed or does not match the recipe."""


class CheckpointError(MnemaxError):
    """A checkpoint cannot be read or does not match the recipe."""


def unknown_choice(key: str, value: object, choices: tuple) -> ConfigError:
    """The error for `key` (its full override path, e.g. `model.memory.variant`) set to a value
    outside its `Literal` choices; the override parser and the configs' checks share it."""
    return ConfigError(f"{key}={value!r} is unknown; choose one of "
                       f"{', '.join(map(str, choices))}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[tuple, bool]]:
    """`{field: (choices, is_tuple)}` for the fields of dataclass `cls` annotated `Literal[...]`
    or `tuple[Literal[...], ...]` (string annotations are resolved in `cls`'s module)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        is_tuple = typing.get_origin(hint) is tuple
        if is_tuple:
            hint = (typing.get_args(hint) or (None,))[0]
        if typing.get_origin(hint) is typing.Literal:
            out[field.name] = (typing.get_args(hint), is_tuple)
    return out


def check_choices(config: object, path: str) -> None:
    """Raises ConfigError for a `Literal` field of the dataclass `config` whose value is not one
    of its choices (Python does not enforce `Literal`). `path` is `config`'s place in the recipe
    (`"model.memory"`), so the message names the key to `--set`. Call it in `__post_init__`."""
    for name, (choices, is_tuple) in _literal_fields(type(config)).items():
        value = getattr(config, name)
        for item in value if is_tuple else (value,):
            if item not in choices:
                raise unknown_choice(f"{path}.{name}", item, choices)


def check_block_indices(path: str, layers: tuple[int, ...], num_layers: int) -> None:
    """Raises ConfigError if `layers` (the blocks a component sits in, the recipe key
    `{path}.layers`) names a block outside a model of `num_layers` blocks."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{path}.layers={layers} names blocks {bad} outside the "
                          f"model's {num_layers} layers")
