"""Typed profile values: YAML values checked against dataclass type hints, and the error that names where.

:func:`coerce` checks one value against a type hint (converting where that loses nothing), :func:`from_dict`
builds a dataclass from a mapping, and both raise :class:`ConfigError` naming the source (a file or a ``--set``)
and the dotted field. :func:`check_sizes` is the check of size fields (token budgets, counts) that config
dataclasses run in ``__post_init__``. :mod:`lwlib.config` (profiles) and :mod:`lwlib.decodings` build on this
module, which imports nothing of lwlib.

Usage::

    cfg = from_dict(ProbeConfig, {"templates": "4"}, where="probe", source="smoke.yaml")
    check_sizes(self, "probe", 1, "templates", "max_new_tokens")      # in a config's __post_init__
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")




class ConfigError(ValueError):
    """A bad profile value: ``str(e)`` is ``"<source>: <dotted path>: <reason>"``.

    ``source`` is the file (or the override, e.g. ``--set sft.max_steps=ten``), ``path`` the dotted field or
    section the reason is about, and ``fields`` the full dotted fields involved (for an unknown-field error:
    each unknown field), from which :class:`Profile` tells a file's mistake from an override's.
    """

    def __init__(self, source: str, path: str, reason: str, fields: typing.Iterable[str] = ()):
        self.source, self.path, self.reason = str(source or ""), path, reason
        self.fields = tuple(fields) or ((path,) if path else ())
        super().__init__(": ".join(x for x in (self.source, self.path, self.reason) if x))

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(source, self.path, self.reason, self.fields)


# ------------------------------------------------------------------------------------- typed values

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_UNION_TYPES = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> float | int | None:
    """``value`` as a number when it is one or a numeric string (YAML reads ``1e-4`` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        s = value.strip()
        return int(s) if re.fullmatch(r"[+-]?\d+", s) else float(s)
    return None


def _exact(value: Any, tp: Any) -> bool:
    """Whether ``value`` already has type ``tp`` (no coercion needed): picks the member of a union."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return False


def coerce(value: Any, tp: Any, path: str = "", source: str = "") -> Any:
    """Check ``value`` against type hint ``tp`` and convert it where that loses nothing.

    Rules: ``float`` takes ints and numeric strings (``"1e-4"``, which YAML reads as a string);
    ``int`` takes ints, numeric strings and floats with an integral value (``5.0``, ``"1e3"``), never
    ``5.5`` or ``true``; ``bool`` takes only ``true``/``false``; ``str`` takes only strings (``model: 7``
    is an error); lists, mappings and nested dataclasses are checked element by element; a union
    (``bool | str``, ``int | None``) takes the first member the value already is, else the first it
    converts to; ``Literal[...]`` takes only its values; other hints are not checked.
    Raises :class:`ConfigError` (``<source>: <path>: expected float, got 'abc'``).
    """

    def bad(reason: str | None = None) -> ConfigError:
        return ConfigError(source, path, reason or f"expected {_type_name(tp)}, got {value!r}")

    if tp is Any or tp is None or isinstance(tp, (str, TypeVar)):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        for a in args:
            if _exact(value, a):
                return coerce(value, a, path, source)
        for a in args:
            try:
                return coerce(value, a, path, source)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if _exact(value, tp):
            return value
        raise bad()
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where=path, source=source)
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        n = _number(value)
        if isinstance(n, int):
            return n
        if isinstance(n, float) and n.is_integer():
            return int(n)
        raise bad()
    if tp is float:
        n = _number(value)
        if n is None:
            raise bad()
        return float(n)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise bad()
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad(f"expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        out = [coerce(v, elem, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return (tuple if (origin or tp) is tuple else set if (origin or tp) is set else list)(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {coerce(k, kt, f"{path}.{k}", source): coerce(v, vt, f"{path}.{k}", source) for k, v in value.items()}
    return value  # a hint this checker does not know: passed through unchecked


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "", source: str = "") -> T:
    """Construct dataclass ``cls`` from ``raw``, every value checked and coerced by :func:`coerce`.

    ``where`` is the dotted path of ``raw`` (``"sft"``), ``source`` the file or override it came from;
    errors read ``"<source>: <where>.<field>: <reason>"``: unknown fields (with the close known names),
    wrongly typed values, and the ``ValueError`` of the dataclass's ``__post_init__``. Nested dataclass
    fields are built recursively from nested mappings.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"expected a mapping ({cls.__name__}), got {raw!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        close = {u: difflib.get_close_matches(str(u), list(known), n=1) for u in unknown}
        hint = ", ".join(f"{c[0]!r} for {u!r}" for u, c in close.items() if c)
        raise ConfigError(source, where, f"unknown field(s) {unknown}" + (f" (did you mean {hint}?)" if hint else "")
                          + f"; {cls.__name__} has {sorted(known)}", [_join(where, str(u)) for u in unknown])
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # an annotation that does not resolve: a bug in the config class, not the profile
        raise ConfigError(source, where, f"{cls.__module__}.{cls.__name__}: cannot resolve its type hints "
                          f"({type(e).__name__}: {e})") from e
    kwargs = {k: coerce(v, hints.get(k, Any), _join(where, k), source) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        # a check that names its field first ("name must be ...", "sft.loss must be ...") is about that field:
        # fields then holds it too, so that an override of that field is blamed for it (Profile.blame)
        about = _field_named(str(e), known)
        raise ConfigError(source, where, str(e), [x for x in (where, about and _join(where, about)) if x]) from e


_LEADING_NAME = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)\b")


def _field_named(message: str, known: typing.Iterable[str]) -> str | None:
    """The field a ``__post_init__`` message starts with (``"sft.loss must be ..."`` -> ``loss``), if it is one of
    ``known``."""
    m = _LEADING_NAME.match(message)
    return m.group(1) if m and m.group(1) in set(known) else None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_sizes(obj: Any, section: str, minimum: float, *names: str) -> None:
    """Raise ``ValueError("<section>.<name> must be >= <minimum>, got <value>")`` for the first field of ``obj``
    among ``names`` below ``minimum``: a size field (a count, a token budget) of a config dataclass, checked in its
    ``__post_init__`` so that ``python -m lwlib.config check`` refuses it. None passes (an unset optional size) and a
    list is checked element by element.

    Usage: ``check_sizes(self, "probe", 1, "templates", "max_new_tokens", "lengths")``
    """
    for name in names:
        value = getattr(obj, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not v >= minimum:
                raise ValueError(f"{_join(section, name)} must be >= {minimum}, got {value!r}")


