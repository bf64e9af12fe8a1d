"""Building config dataclasses from plain dicts (YAML, bundles, ``--set``) with clear errors."""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, TypeVar

from xbm.errors import ConfigError

T = TypeVar("T")


def from_fields(cls: type[T], d: dict[str, Any], owner: str | None = None) -> T:
    """``cls(**d)``, but an unknown key is a one-line :class:`ConfigError` listing valid fields.

    Validation of the values themselves stays in each dataclass's ``__post_init__``.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = set(d) - names
    if extra:
        raise ConfigError(
            f"{owner or cls.__name__} has no field(s) {', '.join(sorted(extra))}; valid: "
            f"{', '.join(sorted(names))}"
        )
    return cls(**_numbers_from_text(cls, d, owner))


def _float_fields(cls: type, kind: type = float) -> set[str]:
    """Names of the fields typed ``float`` (or ``float | None``; ``kind`` picks another type)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: leave the values alone
        return set()
    out = set()
    for name, hint in hints.items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
            typing.get_origin(hint) is typing.Union else (hint,)
        if kind in args:
            out.add(name)
    return out


def check_number_fields(obj: Any) -> None:
    """Every field of a config dataclass typed ``float`` or ``int`` (optionally ``| None``)
    must hold a number of that kind (an int for a float is fine; a bool is not a number), so
    that a wrong type is named as such in Python as it is from YAML, not found later by a
    comparison that raises a bare TypeError.

    Raises:
        ConfigError: naming the field, the value and the type it must have.
    """
    cls = type(obj)
    floats = _float_fields(cls)
    for kind, abc, what, names in ((float, numbers.Real, "a number", floats),
                                   (int, numbers.Integral, "an integer",
                                    _float_fields(cls, int) - floats)):
        for name in sorted(names):
            v = getattr(obj, name, None)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, abc):
                raise ConfigError(f"{cls.__name__}.{name} must be {what}, got {v!r} "
                                  f"({type(v).__name__})")
            if type(v) not in (int, float):  # numpy's scalars: plain numbers for JSON metadata
                object.__setattr__(obj, name, kind(v))


def _numbers_from_text(cls: type, d: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """Read numbers that YAML left as text. PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is
    a string, not a float; a float field given such a string gets its number, and a string that
    is no number at all is a clear error rather than a confusing comparison later."""
    floats = _float_fields(cls)
    out = dict(d)
    for k, v in d.items():
        if k in floats and isinstance(v, str):
            try:
                out[k] = float(v)
            except ValueError:
                raise ConfigError(f"{owner or cls.__name__}.{k} must be a number, got {v!r}"
                                  ) from None
    return out
