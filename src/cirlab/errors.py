"""The one error type a user can cause; the CLI prints its message on one line and exits non-zero."""


class CirlabError(Exception):
    """A problem the user can fix: the message names the file, row, field or value, and how to fix it."""

