"""User-facing errors.

Anything the user can fix (a config key, a data folder, a checkpoint that does not match) raises
`MegatrainError` with one line that names the thing and the fix. The CLIs print that line and exit
2 without a traceback; everything else is a bug and keeps its traceback.
"""


class MegatrainError(ValueError):
    """A problem with the user's input: config, data, checkpoint or command line."""


class ConfigError(MegatrainError):
    """A bad config file, key, value or combination of values."""


class DataError(MegatrainError):
    """A missing, malformed or corrupted data file, shard or manifest."""


class CheckpointError(MegatrainError):
    """A checkpoint that is missing, incomplete or does not match the run."""


class TrainingError(MegatrainError):
    """The run stopped itself: it cannot go on as configured (e.g. too many non-finite steps)."""
