"""One exception hierarchy for every user-facing failure.

The CLI turns any ``QwenlabError`` into one line on stderr and exit code 2; anything else is a bug.
"""


class QwenlabError(Exception):
    """Base class of every error qwenlab raises on purpose."""


class ConfigError(QwenlabError, ValueError):
    """A model config (config.json, preset, override) is missing, unsupported or inconsistent."""


class CheckpointError(QwenlabError):
    """A checkpoint directory or file cannot be read as the config says it should be."""


class RequestError(QwenlabError, ValueError):
    """A generation/serving request has an invalid field."""


class TrainingError(QwenlabError):
    """A training config or run is invalid."""
