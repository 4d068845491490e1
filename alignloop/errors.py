"""Exceptions shared across the package."""


class UserFacingError(Exception):
    """An error whose message tells the user what to do; the CLI prints it without a traceback."""
