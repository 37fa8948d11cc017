"""Exception types. Every error names the file, record or value that is wrong."""

from __future__ import annotations

__all__ = [
    "FedummError",
    "ConfigError",
    "DataError",
    "InvalidUpdate",
    "AdapterStateError",
    "CheckpointError",
    "EngineError",
]


class FedummError(Exception):
    """Base class of every error fedumm raises on purpose."""


class ConfigError(FedummError):
    """A configuration file or override is malformed or inconsistent."""


class DataError(FedummError):
    """A dataset, partition or metadata file is missing or malformed."""


class InvalidUpdate(FedummError):
    """A client update cannot be aggregated (missing example count, wrong keys, non-finite values...)."""


class AdapterStateError(FedummError):
    """An adapter state does not match the model it is loaded into (keys, shapes, dtypes)."""


class CheckpointError(FedummError):
    """A run checkpoint is missing, partial or corrupt."""


class EngineError(FedummError):
    """An execution engine failed (quorum lost, a process died, a timeout expired)."""
