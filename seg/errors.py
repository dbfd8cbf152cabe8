"""Exceptions raised by the core. Each message says what is wrong and how to fix it."""


class SegError(Exception):
    """Base class for every error the project raises on purpose."""


class ConfigError(SegError, ValueError):
    """A config file, override or search space is invalid."""


class DataError(SegError):
    """The data set on disk is missing, incomplete or malformed."""


class CheckpointError(SegError):
    """A checkpoint cannot be read, or does not match what is asked of it."""


class DivergenceError(SegError):
    """Training produced a non-finite loss."""


class WeightsNotFoundError(SegError):
    """Pretrained weights were asked for but are not available offline."""


class TrackingError(SegError):
    """The tracking store, or a search or run asked for in it, is missing or unusable."""
