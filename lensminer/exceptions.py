"""Exceptions raised by LensMiner.

Every class also subclasses the builtin exception that matches its meaning, so callers that
already catch ``ValueError`` or ``OSError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CutoutParseError",
    "DownloadError",
    "InvalidQueryError",
    "LensMinerError",
    "PretrainError",
    "QueryNotFoundError",
    "StoreError",
    "StoreIncompleteError",
    "StoreNotFoundError",
    "SurveyServerError",
    "TargetError",
]


class LensMinerError(Exception):
    """Base class of every error that LensMiner raises on purpose."""


class ConfigError(LensMinerError, ValueError):
    """A configuration value is invalid or a configuration file cannot be read."""


class TargetError(LensMinerError, ValueError):
    """A target table is missing columns or contains invalid coordinates."""


class CutoutParseError(LensMinerError, ValueError):
    """A cutout response (FITS or JPEG bytes) is malformed or does not match the request."""


class DownloadError(LensMinerError, OSError):
    """A cutout request failed after its retries, or failed in a way that cannot succeed."""


class StoreError(LensMinerError, RuntimeError):
    """A Zarr store has the wrong layout or contents for the requested operation."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A Zarr store does not exist at the given URL."""


class StoreIncompleteError(StoreError):
    """A Zarr store exists but some of its shards have not been written yet."""


class CheckpointError(LensMinerError, ValueError):
    """A model checkpoint or exported encoder is missing, corrupt or incompatible."""


class PretrainError(LensMinerError, RuntimeError):
    """A pretraining process exited with an error or without reporting its result."""


class InvalidQueryError(LensMinerError, ValueError):
    """A similarity query has an invalid row, position or number of neighbours."""


class QueryNotFoundError(LensMinerError, ValueError):
    """A similarity query matches no indexed object.

    The query row has no embedding, or no embedded object lies within the match radius of the
    query position.
    """


class SurveyServerError(LensMinerError, ValueError):
    """The local survey server was given an invalid image source or request."""
