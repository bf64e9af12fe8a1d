"""Building config dataclasses from plain dicts (YAML, bundles, ``--set``) with clear errors."""

from __future__ import annotations

import dataclasses
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
    return cls(**d)
