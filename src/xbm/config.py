"""Building config dataclasses from plain dicts (YAML, bundles, ``--set``) with clear errors."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from typing import Any, TypeVar

from xbm.errors import ConfigError

T = TypeVar("T")

#: YAML 1.2's floats, ``1e-3`` and ``5E4`` included. PyYAML follows YAML 1.1, where an exponent
#: needs a dot (``1.0e-3``): ``lr: 1e-3`` was read as the text "1e-3", converted where a config
#: field took it but recorded as text in results.json, so two runs at the same rate looked
#: different to every comparison of their configs.
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X)


#: YAML 1.2's integers: decimal (leading zeros allowed, still decimal), ``0o`` octal, ``0x``
#: hex. YAML 1.1 read ``seed: 0042`` as octal 34 and ``1:30`` as 90 (base 60), silently.
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")


#: YAML 1.2 booleans (the core schema): 1.1's yes/no/on/off/y/n are text.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _yaml12_int(loader: Any, node: Any) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2 numbers and no duplicate keys."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # `lr: 1e-3` then `lr: 2e-3` kept the last without a word (a merge key `<<` may
            # still override: that is what it is for)
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.line + 1}); keep "
                        "one", key_node.start_mark)
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    # drop 1.1's number and boolean resolvers, then add 1.2's: 1.1 read `augment: off` as
    # False and `task: no` as False (the "Norway problem"); only true and false are booleans
    replaced = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")
    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in replaced]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
    return Loader


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers and booleans (``1e-3`` is a float, as in JSON;
    ``0042`` is 42, not octal 34; ``1:30`` is text, not 90; ``on``, ``yes`` and ``no`` are
    text, only ``true`` and ``false`` are booleans).

    Raises:
        yaml.YAMLError: as ``yaml.safe_load``.
    """
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def from_fields(cls: type[T], d: dict[str, Any], owner: str | None = None) -> T:
    """``cls(**d)``, but an unknown key is a one-line :class:`ConfigError` listing valid fields.

    Validation of the values themselves stays in each dataclass's ``__post_init__``.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    odd = [k for k in d if not isinstance(k, str)]
    if odd:  # YAML reads `1:` or `on:` as a number or a bool
        raise ConfigError(f"{owner or cls.__name__}: field names must be text, got "
                          f"{', '.join(repr(k) for k in odd)}; valid: {', '.join(sorted(names))}")
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


def _plain_number_fields(cls: type) -> set[str]:
    """Fields typed ``float`` or ``int`` without ``| None``: None is no value for them."""
    return (_float_fields(cls) | _float_fields(cls, int)) - _float_fields(cls, type(None))


def is_finite_number(v: object) -> bool:
    """A real number (not a bool) that is neither nan nor infinite; an int beyond any float
    counts as not finite rather than raising ``OverflowError``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def check_number_fields(obj: Any) -> None:
    """Every field of a config dataclass typed ``float`` or ``int`` (optionally ``| None``)
    must hold a number of that kind (an int for a float is fine; a bool is not a number), so
    that a wrong type is named as such in Python as it is from YAML, not found later by a
    comparison that raises a bare TypeError. Fields typed ``bool`` or a list of numbers are
    checked too (:func:`_check_other_fields`).

    Raises:
        ConfigError: naming the field, the value and the type it must have.
    """
    cls = type(obj)
    floats = _float_fields(cls)
    plain = _plain_number_fields(cls)
    for kind, abc, what, names in ((float, numbers.Real, "a number", floats),
                                   (int, numbers.Integral, "an integer",
                                    _float_fields(cls, int) - floats)):
        for name in sorted(names):
            v = getattr(obj, name, None)
            if v is None:
                if name in plain:  # `threshold: null` compared None with a float later
                    raise ConfigError(f"{cls.__name__}.{name} must be {what}, got None (null); "
                                      "leave it out for the default")
                continue
            if isinstance(v, bool) or not isinstance(v, abc):
                raise ConfigError(f"{cls.__name__}.{name} must be {what}, got {v!r} "
                                  f"({type(v).__name__})")
            if not is_finite_number(v):  # nan: every comparison false (a mask at chance)
                raise ConfigError(f"{cls.__name__}.{name} must be a finite number, got {v!r}")
            if type(v) not in (int, float):  # numpy's scalars: plain numbers for JSON metadata
                object.__setattr__(obj, name, kind(v))
    _check_other_fields(obj)


#: What YAML 1.1 read as booleans; YAML 1.2 (xbm's reader) and ``--set`` leave them text.
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _check_other_fields(obj: Any) -> None:
    """Fields typed ``bool`` or ``list``/``tuple`` of numbers must hold one (a user's config
    class too: ``--set frozen=no`` set the text 'no', which counts as true, and ``--set
    levels=oops`` failed mid-training). Text fields are left to each class, whose messages
    name what the text must be (a preset name, say)."""
    cls = type(obj)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: leave the values alone
        return
    for f in dataclasses.fields(obj):
        hint, v = hints.get(f.name), getattr(obj, f.name, None)
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
            typing.get_origin(hint) is typing.Union else (hint,)
        if v is None:  # `levels: list[float] = None` is common in a user's class; numbers
            continue   # typed without `| None` were checked above
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            continue
        kind, where = kinds[0], f"{cls.__name__}.{f.name}"
        if kind is bool and not isinstance(v, bool):
            hint_text = (" (yes/no/on/off are text in YAML 1.2 and in --set: write true or "
                         "false)" if isinstance(v, str) and v.lower() in _YAML11_BOOLS else "")
            raise ConfigError(f"{where} must be true or false, got {v!r}{hint_text}")
        origin = typing.get_origin(kind)
        if origin in (list, tuple):
            items = typing.get_args(kind)
            if hasattr(v, "tolist") and not isinstance(v, (list, tuple, str, bytes)):
                v = v.tolist()  # a numpy array or a tensor, as np.linspace gives: kept as a
                if isinstance(v, list):  # plain list (bundle metadata is JSON)
                    object.__setattr__(obj, f.name, v)
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{where} must be a list, got {v!r} ({type(v).__name__}); "
                                  "e.g. [0.5, 1.0]")
            if items and items[-1] is Ellipsis:
                items = items[:1]
            if len(items) == 1 and items[0] in (float, int):
                bad = [x for x in v if not is_finite_number(x) or
                       (items[0] is int and not isinstance(x, numbers.Integral))]
                if bad:
                    what = "integers" if items[0] is int else "finite numbers"
                    raise ConfigError(f"{where} must be a list of {what}, got {v!r}")


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


#: Seeds go to Python's and torch's generators (and a NumPy one would take 32 bits).
MAX_SEED = 2**32 - 1


def check_seed(value: object, what: str = "seed") -> int:
    """``value`` as a seed in [0, 2**32 - 1]; a larger one overflowed deep in torch with a
    traceback.

    Raises:
        ConfigError: not an integer, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{what} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return int(value)


def same_definition(a: object, b: object) -> bool:
    """The same function or class definition, perhaps run again (a notebook cell, a reloaded
    module): same module and qualified name. What the registries let replace an entry."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register_named(store: dict[str, Any], item: Any, cls: type, kind: str,
                   built_in: frozenset[str], reserved: tuple[str, ...] = (), *,
                   owner: str | None = None) -> Any:
    """Add a user's preset ``item`` (a ``cls`` with ``name`` and ``source``) to ``store`` by its
    name: a name of its own, and a source that cites its numbers, as every built-in preset's
    does.

    ``owner`` is the registering module's ``__name__``. The module that registered a name may
    register it again (a reloaded module, a notebook cell run twice, perhaps with edited
    numbers) and replaces its entry. Another module's different preset under that name is
    refused, as the method, model and dataset registries refuse another definition: which
    numbers ``--preset NAME`` priced would otherwise depend on import order. An equal preset
    is accepted from anywhere.

    Raises:
        ValueError: another type, an empty, built-in, ``reserved``-suffixed or another
            module's name, or no source (a programming error, not a user one).
    """
    what = cls.__name__
    if not isinstance(item, cls):
        raise ValueError(f"registering {kind}s takes {what} objects, got {type(item).__name__}")
    name = item.name
    if not name or name == "custom" or name in built_in or (reserved and name.endswith(reserved)):
        raise ValueError(f"{kind} name {name!r} is taken, empty or reserved; name it "
                         f"{what}(name='my-chip', ...)")
    if not str(item.source).strip():
        raise ValueError(f"{kind} {name!r} has no source; cite where its numbers come from "
                         f"({what}(source='paper or tool, table ...'))")
    owners = _PRESET_OWNERS.setdefault(kind, {})
    if name not in store:
        owners[name] = owner
    elif owners.get(name) != owner and store[name] != item:
        raise ValueError(f"{kind} {name!r} is already registered by module {owners.get(name)}, "
                         f"with other numbers; pick another name")
    store[name] = item
    return item


#: Which module registered each user preset, per kind of preset (see ``register_named``).
_PRESET_OWNERS: dict[str, dict[str, str | None]] = {}


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (benchmark --reps, --batch, ...): 0
    gave a StatisticsError or a ZeroDivisionError traceback after the set-up."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def seed_arg(text: str) -> int:
    """argparse type of every ``--seed``-like flag (see :func:`check_seed`)."""
    import argparse

    try:
        return check_seed(int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}"
                                         ) from None
