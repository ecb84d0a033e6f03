"""Errors whose message a person can act on: which file, what is wrong, what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: str(error) is meant to be shown to the user as is; `hint` says what to do when the
    message alone does not (the CLI prints it, and puts it in its JSON error object)."""

    def __init__(self, message: str = "", hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(EngineError, ValueError):
    """A value that cannot work (a budget, a thread count, a sampling setting), refused before anything
    loads. Also a ValueError, so callers that already catch bad values keep doing so."""


class ModelError(EngineError):
    """A model folder that is missing, corrupt, or not supported."""


class InsufficientMemoryError(ModelError):
    """The model would not fit this machine; raised before anything large is allocated."""


class Cancelled(EngineError):
    """A long operation (load, profile) was cancelled by the user."""
