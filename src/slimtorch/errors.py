"""Exception types. Every user-facing failure raises a subclass of SlimtorchError with a message
that names the problem (the bad key, the pattern, the file, the allowed range)."""


class SlimtorchError(Exception):
    """Base class of every error slimtorch raises on bad input."""


class ConfigError(SlimtorchError, ValueError):
    """A recipe or config is invalid: unknown key, value out of range, wrong type."""


class PatternError(SlimtorchError, ValueError):
    """An include/exclude pattern matched no module, or no quantizable layer was found."""


class DataError(SlimtorchError, ValueError):
    """A dataset is missing, empty, or fails its checksum."""


class CheckpointError(SlimtorchError, ValueError):
    """A file is not a slimtorch checkpoint / packed model, or it is truncated or corrupt."""
