"""Errors a user can fix. The CLI prints their message as one line, never a traceback."""


class VisrepError(Exception):
    """Base class for every user-fixable error (bad config, missing data, diverged run...)."""


class ConfigError(VisrepError):
    """An unknown key, a bad value or an impossible combination in a config."""


class DataError(VisrepError):
    """A dataset that is missing, empty or unreadable."""


class TrainingError(VisrepError):
    """A run that cannot continue (NaN/Inf loss, incompatible checkpoint...)."""
