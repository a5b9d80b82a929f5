"""The one error type a user can cause; the CLI prints its message on one line and exits non-zero."""


class CirlabError(Exception):
    """A problem the user can fix: the message names the file, row, field or value, and how to fix it."""



def check_choice(value, allowed, what: str, error: type = CirlabError) -> None:
    """Raise `error` naming `what`, the allowed values and the one given, unless `value` is one of `allowed`."""
    if value not in allowed:
        raise error(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
