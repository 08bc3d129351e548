"""Exceptions for mistakes a user can fix."""


class InvalidInputError(ValueError):
    """A user-supplied value is invalid; the message names the value and the fix."""
