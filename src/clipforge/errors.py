"""Exceptions that carry a message meant for the user (the CLI prints them as one line)."""


class ClipforgeError(Exception):
    """Base class for errors caused by input, files or configuration rather than bugs."""


class CheckpointError(ClipforgeError):
    """A checkpoint could not be recognised, read safely, or mapped onto a model."""


class DataError(ClipforgeError):
    """A dataset could not be read, or nothing usable was left in it."""
