"""The errors every layer raises for a bad setting or a bad checkpoint, so callers catch one type and users see
the key or the file."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, untrusted or incompatible with this run; names the file."""
