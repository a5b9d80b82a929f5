"""The one error type a user can cause; the CLI prints its message on one line and exits non-zero."""


class CirlabError(Exception):
    """A problem the user can fix: the message names the file, row, field or value, and how to fix it."""


def require_file(path, what: str = "file") -> None:
    """Raise a CirlabError naming `path` when it does not exist."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise CirlabError(f"{what} not found: {p}")
