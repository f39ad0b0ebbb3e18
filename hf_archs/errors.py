"""Errors raised at the package's edges: bad configs, bad checkpoints, bad inputs."""


class ConfigError(ValueError):
    """A config field is invalid; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint is missing, has extra or mis-shaped tensors, or a file is corrupt; the message names it."""


class InputError(ValueError):
    """Model inputs are invalid (empty, out of vocabulary, wrong dtype)."""
