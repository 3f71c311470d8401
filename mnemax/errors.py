"""User-facing errors.

Every error a user can cause (a bad recipe key, a mesh that does not divide a shape, a missing
data directory, a corrupt checkpoint) is raised as a subclass of `MnemaxError` with a message that
names the bad value, the rule it broke and the fix. The CLI prints these as one paragraph,
without a traceback; anything else is a bug and keeps its traceback.
"""


class MnemaxError(Exception):
    """Base class of errors caused by user input, shown without a traceback."""


class ConfigError(MnemaxError):
    """A recipe, an override or a strategy is invalid."""


class DataError(MnemaxError):
    """A data source is missing, malformed or does not match the recipe."""


class CheckpointError(MnemaxError):
    """A checkpoint cannot be read or does not match the recipe."""
