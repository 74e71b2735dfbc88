"""Typed errors. The library raises these; the CLI turns them into messages and exit codes."""

from __future__ import annotations


class MatchingError(Exception):
    """Base class of every error this library raises on purpose."""


class InputFileError(MatchingError):
    """A user file cannot be read: missing, a directory, no permission, wrong encoding, empty."""


class SchemaError(MatchingError):
    """A user table lacks a required column or has the wrong shape."""


class BadRowError(MatchingError):
    """A row holds a value that cannot be used (empty title, missing id)."""


class DuplicateIdError(MatchingError):
    """Two rows share one external id."""


class ModelError(MatchingError):
    """A model directory is missing or is not a usable BERT-family checkpoint."""


class BundleError(MatchingError):
    """A bundle directory is missing, is not a bundle, is damaged, or would be overwritten."""


class ConfigError(MatchingError):
    """A configuration value is out of range or unknown."""


class BundleLockedError(BundleError):
    """Another writer is changing the bundle; wait for it to finish, or raise ``lock_timeout``."""


class DeadlineError(MatchingError):
    """Work ran past the deadline set around it (:func:`matching.deadline.within`) and stopped part-way."""
