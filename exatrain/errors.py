"""The error every layer raises for a bad setting, so callers catch one type and users see the key."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""
