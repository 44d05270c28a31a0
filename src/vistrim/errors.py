"""The one error type users see: a one-line message naming the problem."""


class VistrimError(Exception):
    """Bad input or an unsupported setup; the message is a single line meant for the user."""
