"""Metadata filters: which items a search may return, from each item's JSON metadata.

A filter is a JSON object. Each key is a metadata field, its value the condition; several keys must all hold:
- a string, number or boolean: equality (`{"colour": "red"}`);
- `{"in": [v, ...]}`: one of the values; `{"gt" | "gte" | "lt" | "lte": number}` (several combine): a range,
  which an item whose field is missing or not a number fails;
- `{"and": [filter, ...]}` and `{"or": [filter, ...]}` as keys of their own, nested freely.
A missing field fails every condition. `check_filter` refuses anything else with the part it cannot read.
"""
from __future__ import annotations

import numbers

from cirlab.errors import CirlabError

RANGES = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}
SCALAR = (str, bool, numbers.Number)


def _bad(what: str, where: str) -> CirlabError:
    return CirlabError(f"filter{where}: {what}")


def check_filter(spec, where: str = "") -> dict:
    """`spec` if it is a valid filter (see the module docstring), else CirlabError naming the part."""
    if not isinstance(spec, dict):
        raise _bad(f"expected a JSON object, got {type(spec).__name__}", where)
    for key, cond in spec.items():
        at = f"{where}.{key}"
        if key in ("and", "or"):
            if not isinstance(cond, list) or not cond:
                raise _bad(f"'{key}' takes a non-empty list of filters", at)
            for n, sub in enumerate(cond):
                check_filter(sub, f"{at}[{n}]")
        elif isinstance(cond, dict):
            unknown = set(cond) - set(RANGES) - {"in"}
            if unknown or not cond:
                raise _bad(f"unknown condition {sorted(unknown) or '{}'}; use in, gt, gte, lt, lte", at)
            if "in" in cond and (not isinstance(cond["in"], list) or not all(isinstance(v, SCALAR)
                                                                             for v in cond["in"])):
                raise _bad("'in' takes a list of strings, numbers or booleans", at)
            for op in set(cond) & set(RANGES):
                if isinstance(cond[op], bool) or not isinstance(cond[op], numbers.Number):
                    raise _bad(f"'{op}' takes a number, got {cond[op]!r}", at)
        elif not isinstance(cond, SCALAR):
            raise _bad(f"a condition is a string, number, boolean or an object of in/gt/gte/lt/lte, got "
                       f"{type(cond).__name__}", at)
    return spec


def _same(value, cond) -> bool:
    """Equality of kinds: a boolean equals only a boolean, a number any equal number, a string the same string."""
    if isinstance(cond, bool) or isinstance(value, bool):
        return isinstance(cond, bool) and isinstance(value, bool) and value == cond
    if isinstance(cond, numbers.Number):
        return isinstance(value, numbers.Number) and value == cond
    return isinstance(value, str) and value == cond


def _holds(cond, value) -> bool:
    if not isinstance(cond, dict):
        return _same(value, cond)
    if "in" in cond and not any(_same(value, c) for c in cond["in"]):
        return False
    ranges = [op for op in cond if op in RANGES]
    if ranges and (isinstance(value, bool) or not isinstance(value, numbers.Number)):
        return False
    return all(RANGES[op](value, cond[op]) for op in ranges)


def matches(spec: dict, meta: dict) -> bool:
    """Whether an item with metadata `meta` passes the filter `spec` (already checked)."""
    for key, cond in spec.items():
        if key == "and":
            if not all(matches(s, meta) for s in cond):
                return False
        elif key == "or":
            if not any(matches(s, meta) for s in cond):
                return False
        elif key not in meta or not _holds(cond, meta[key]):
            return False
    return True
