"""The one error type a user can cause; the CLI prints its message on one line and exits non-zero. Config fields
with a closed set of values are `Choice` enums, checked by `parse_choices`."""
from __future__ import annotations

from enum import StrEnum


class CirlabError(Exception):
    """A problem the user can fix: the message names the file, row, field or value, and how to fix it."""



def check_choice(value, allowed, what: str, error: type = CirlabError) -> None:
    """Raise `error` naming `what`, the allowed values and the one given, unless `value` is one of `allowed`."""
    if value not in allowed:
        raise error(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


class Choice(StrEnum):
    """A config field's closed set of values. Members are strings (`BankMode.OFF == "off"`, JSON writes "off"), so
    configs stay plain JSON; `parse_choices` turns the strings a config was given into members, or names the field,
    the allowed values and the value given."""

    @classmethod
    def of(cls, value, what: str, error: type = CirlabError) -> "Choice":
        """The member named by `value`; `error` naming `what`, the allowed values and `value` if there is none."""
        check_choice(value, [m.value for m in cls], what, error)
        return cls(value)


def parse_choices(config, error: type = CirlabError) -> None:
    """Convert every field of the dataclass `config` annotated with a `Choice` subclass (or `Choice | None`) to its
    member, in place."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                 if isinstance(t, type) and issubclass(t, Choice)]
        value = getattr(config, f.name)
        if kinds and value is not None:
            setattr(config, f.name, kinds[0].of(value, f"{type(config).__name__}.{f.name}", error))
