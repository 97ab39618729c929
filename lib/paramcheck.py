"""Checks shared by the params dataclasses: types as annotated, choices, ranges; errors name the key."""
from dataclasses import fields
from typing import get_args, get_origin, get_type_hints


class ParamsError(ValueError):
    """A parameter is unknown, mistyped or out of range."""


def type_ok(value, hint) -> bool:
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if hint is float:  # YAML writes 2e-4 as a float but 1 as an int; both are fine floats
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint)) if get_origin(hint) is None else str(hint)


def choice(name, value, allowed):
    if value not in allowed:
        raise ParamsError(f"parameter {name!r} must be one of {list(allowed)}, got {value!r}")


def template(name):
    from . import prompts

    try:
        prompts.template(name)
    except KeyError as e:
        raise ParamsError(e.args[0]) from None


def positive(p, *names):
    for n in names:
        if getattr(p, n) <= 0:
            raise ParamsError(f"parameter {n!r} must be > 0, got {getattr(p, n)!r}")


def non_negative(p, *names):
    for n in names:
        if getattr(p, n) < 0:
            raise ParamsError(f"parameter {n!r} must be >= 0 (0 = all / off), got {getattr(p, n)!r}")


def fraction(name, value):
    if not 0 <= value < 1:
        raise ParamsError(f"parameter {name!r} must be in [0, 1), got {value!r}")


def check_types(obj):
    """Every field of a params dataclass has its annotated type (YAML and papermill give untyped values)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        v = getattr(obj, f.name)
        if not type_ok(v, hints[f.name]):
            raise ParamsError(f"parameter {f.name!r} must be {type_name(hints[f.name])}, got {v!r}")
