"""Error types: each message is one line naming the file, key or argument at fault."""


class DiffGemError(ValueError):
    """Base class of the package's input errors."""


class ConfigError(DiffGemError):
    """A config.json / generation_config.json that cannot be used."""


class CheckpointError(DiffGemError):
    """A missing, unexpected or mis-shaped tensor, or a missing file."""
