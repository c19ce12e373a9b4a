"""Typed settings: the machinery every section of a profile is built with (:mod:`datagen.config`).

A section is a frozen dataclass deriving from :class:`Section`: every field is checked against its
annotation on construction (``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal`` choices,
tuples of strings, nested sections), with bounds given by :func:`bounded`, so a section made in code
(``dataclasses.replace``) is as valid as one read from YAML. :func:`check_keys` refuses a key a
section does not have, naming its path and the file and suggesting the nearest known key. A
:class:`SectionMap` is a mapping of named sections of one type whose names come from elsewhere
(``ray.stages``: the stage table's). Every error is a :class:`ProfileError` naming the key path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

AUTO = "auto"


class ProfileError(ValueError):
    """A profile or overlay cannot be read, or a setting is unknown, missing or malformed."""


class BadValue(ProfileError):
    """A field's value is wrong; ``key`` is relative to the section that raised it."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def bounded(default: Any = dataclasses.MISSING, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A field with bounds: ``minimum``/``maximum`` inclusive, ``above`` exclusive."""
    meta = {"minimum": minimum, "maximum": maximum, "above": above}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Section:
    """A typed section: every field is checked against its annotation (and bounds) on construction,
    so a section made in code (``dataclasses.replace``) is as valid as one read from YAML."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint, optional = _section_hint(hints[f.name])
            if value is None and optional:
                pass  # an optional section left out
            elif _nested(hint):
                if isinstance(value, Mapping) and not isinstance(value, hint):
                    value = hint.from_mapping(value, f.name)
                elif not isinstance(value, hint):
                    raise BadValue(f.name, f"must be a mapping of settings, got {value!r}")
            else:
                value = _check(value, hint, f.name, f.metadata)
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_mapping(cls, data: Any, path: str = "", source: str | None = None):
        """The section from a mapping of YAML values; errors name the full key path (``path.key``)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ProfileError(f"{path or 'the profile'} must be a mapping of settings, got {data!r}")
        check_keys(cls, data, path, source)
        hints = field_types(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            hint, optional = _section_hint(hints[f.name])
            nested = _nested(hint)
            if f.name in data:
                values[f.name] = hint.from_mapping(data[f.name], join_key(path, f.name)) if nested else data[f.name]
            elif nested and not optional:
                values[f.name] = hint.from_mapping({}, join_key(path, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{join_key(path, f.name)} is required but not set")
        try:
            return cls(**values)
        except BadValue as e:
            raise ProfileError(f"{join_key(path, e.key)} {e.problem}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SectionMap(dict):
    """A mapping of named sections of one type (:attr:`item`); the names are :meth:`known`'s, a name
    left out takes the section's defaults, and an unknown one is refused with a suggestion. Reads as
    a mapping or by attribute."""

    item: type = Section

    @staticmethod
    def known() -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def from_mapping(cls, data: Any, path: str = "", source: str | None = None) -> SectionMap:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ProfileError(f"{path} must be a mapping of settings, got {data!r}")
        check_keys(cls, data, path, source)
        return cls({
            name: v if isinstance(v := data.get(name, {}), cls.item) else cls.item.from_mapping(v, join_key(path, name))
            for name in cls.known()
        })

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def check_keys(cls: type, data: Mapping[str, Any], path: str = "", source: str | None = None) -> None:
    """Raise :class:`ProfileError` for the first key of ``data`` (recursively) that ``cls`` lacks,
    naming its path and ``source`` and suggesting the nearest known key."""
    if not isinstance(data, Mapping):
        return  # the type check says what is wrong
    if issubclass(cls, SectionMap):
        known = list(cls.known())
        hints = dict.fromkeys(known, cls.item)
    else:
        hints = field_types(cls)
        known = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {join_key(path, close[0])!r}?" if close else f"known keys here: {', '.join(known)}"
            where = f" in {source}" if source else ""
            raise ProfileError(f"unknown setting {join_key(path, str(key))!r}{where}; {hint}")
        sub = _section_hint(hints[key])[0]
        if _nested(sub):
            check_keys(sub, value, join_key(path, key), source)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ------------------------------------------------------------------------------ checking
def _section_hint(hint: Any) -> tuple[Any, bool]:
    """``(hint, False)``, or ``(Section class, True)`` for an optional section (``XSettings | None``:
    left out of a profile, it is ``None``)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    sections = [o for o in options if _nested(o)]
    if len(sections) == 1 and type(None) in options and len(options) == 2:
        return sections[0], True
    return hint, False


def _nested(hint: Any) -> bool:
    """A field typed by a section (or a map of sections), read from a nested mapping."""
    return isinstance(hint, type) and issubclass(hint, Section | SectionMap)


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """``value`` if it fits ``hint`` (and the bounds in ``meta``), else :class:`BadValue`.
    Numbers are kept as given (an int stays an int in a float field), so the config digest of a
    profile does not depend on how its numbers were spelled before."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    choices = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
    kinds = [o for o in options if typing.get_origin(o) is not Literal]
    if value is None:
        if type(None) in kinds:
            return None
        if AUTO in choices:
            return AUTO
    if isinstance(value, str) and choices:
        for choice in choices:
            if value.lower() == str(choice).lower():
                return choice
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return _bounded(value, key, meta)
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise BadValue(key, f"must be a finite number, got {value!r}")
            return _bounded(value, key, meta)
        if kind is str and isinstance(value, str):
            if not value.strip():
                raise BadValue(key, f"must not be empty, got {value!r}")
            return value
        if typing.get_origin(kind) is dict and isinstance(value, Mapping):
            return dict(value)
        if typing.get_origin(kind) is tuple and isinstance(value, list | tuple):
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise BadValue(key, f"must be a list of non-empty strings, got {value!r}")
            return tuple(value)
    raise BadValue(key, f"must be {_describe(choices, kinds)}, got {value!r}")


def _bounded(value: float, key: str, meta: Mapping[str, Any]) -> float:
    lo, hi, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise BadValue(key, f"must be in {lo}..{hi}, got {value!r}")
    if lo is not None and value < lo:
        raise BadValue(key, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise BadValue(key, f"must be <= {hi}, got {value!r}")
    if above is not None and value <= above:
        raise BadValue(key, f"must be > {above}, got {value!r}")
    return value


def _describe(choices: list[Any], kinds: list[Any]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    parts = [names.get(k, "a list" if typing.get_origin(k) is tuple else "a mapping") for k in kinds]
    if choices:
        parts.insert(0, "one of " + ", ".join(repr(c) for c in choices) if len(choices) > 1 else repr(choices[0]))
    return " or ".join(parts)
