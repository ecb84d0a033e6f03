"""Errors whose message a person can act on: which file, what is wrong, what to do."""


class EngineError(Exception):
    """Base class: str(error) is meant to be shown to the user as is."""


class ModelError(EngineError):
    """A model folder that is missing, corrupt, or not supported."""


class InsufficientMemoryError(ModelError):
    """The model would not fit this machine; raised before anything large is allocated."""


class Cancelled(EngineError):
    """A long operation (load, profile) was cancelled by the user."""
