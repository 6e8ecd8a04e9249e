"""Errors the project raises for users: each says what was wrong, where, and what was expected."""


class DugeError(Exception):
    """Base class of every error meant for the user (printed without a traceback by the CLI)."""


class ModelLoadError(DugeError):
    """A model path that is not a model the project can load."""


class OutputExistsError(DugeError):
    """An output that already exists, without permission to overwrite it."""


class UnsafePathError(DugeError):
    """An output path that would leave the folder it belongs in."""
