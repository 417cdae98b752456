"""Config dataclasses from and to plain dicts (YAML, JSON), with errors that name the field.

`from_dict` checks every value against its field's type hint (``int``, ``float``, ``bool``,
``str``, ``Literal[...]``, tuples, lists, dicts, optional values, unions and nested dataclasses)
and raises a `DaunceError` naming the field's full path, the type expected and the value given.
An integer is a valid ``float``; a float with no fractional part (``16.0``) is a valid ``int``
and becomes one; nothing else is converted (``16.7`` is no ``int``, ``true`` no number). An
empty section (``evaluation:`` with nothing under it, read as null) takes its defaults.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from daunce_core.errors import DaunceError


def to_dict(value: Any) -> Any:
    """A config dataclass as plain dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; errors name the field (``where``) and the fix.

    Raises:
        DaunceError: ``data`` is no mapping, names unknown fields, lacks required ones, or holds
            a value of the wrong type (the message names its path, e.g. ``daunce.num_models``).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise DaunceError(f"config field {where or '(top)'} must be a mapping; got {data!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DaunceError(
            f"unknown config field(s) {[_join(where, u) for u in unknown]}; "
            f"known fields of {where or 'the config'}: {sorted(known)}."
        )
    values = {
        name: _convert(hints[name], value, _join(where, name))
        for name, value in data.items()
        if not (value is None and dataclasses.is_dataclass(hints[name]))  # an empty section
    }
    try:
        return cls(**values)
    except DaunceError as error:
        if not where or str(error).startswith(("config field", f"{where}.")):
            raise  # the message names its field already (a nested section, the whole config)
        raise DaunceError(f"config field {where}: {error}") from error
    except TypeError as error:
        raise DaunceError(f"config field {where or '(top)'} is incomplete: {error}.") from error


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and built, for dataclasses); errors name ``where``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _union(hint, value, where)
    if not _fits(hint, value):
        raise DaunceError(
            f"config field {where} must be {describe(hint)}; got {value!r} "
            f"({type(value).__name__})."
        )
    if dataclasses.is_dataclass(hint):
        return _item(hint, value, where)
    if origin in (list, tuple):
        items = [_convert(_element(hint, i), v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        key, item = typing.get_args(hint)
        return {
            _convert(key, k, where): _convert(item, v, f"{where}.{k}") for k, v in value.items()
        }
    if hint is int:
        return int(value)
    if hint is float and isinstance(value, str):
        return float(value)  # YAML 1.1's unread exponent form, see `_YAML_EXPONENT`
    return value


def _union(hint: Any, value: Any, where: str) -> Any:
    """The first member of a union (``X | None``, ``A | list[A]``) that ``value`` fits."""
    members = typing.get_args(hint)
    if value is None and type(None) in members:
        return None
    for member in members:
        if member is not type(None) and _fits(member, value):
            return _convert(member, value, where)
    raise DaunceError(
        f"config field {where} must be {describe(hint)}; got {value!r} ({type(value).__name__})."
    )


def _item(cls: type, value: Any, where: str) -> Any:
    """A dataclass: a mapping, or a plain string for a class whose ``from_name`` takes one."""
    if isinstance(value, str):
        return cls.from_name(value)
    return from_dict(cls, value, where)


def _element(hint: Any, index: int) -> Any:
    """The type of item ``index`` of a list or tuple hint (``Any`` when not given)."""
    args = typing.get_args(hint)
    if not args:
        return Any
    if typing.get_origin(hint) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args[index]
    return args[0]


def _fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` has the shape of ``hint`` (its items are checked by `_convert`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(member, value) for member in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint) or (
            isinstance(value, str) and hasattr(hint, "from_name")
        )
    if origin is tuple:
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        return isinstance(value, list | tuple) and (not fixed or len(value) == len(args))
    if hint is list or origin is list:
        return isinstance(value, list | tuple)
    if hint is dict or origin is dict:
        return isinstance(value, Mapping)
    return _fits_scalar(hint, value)


def _fits_scalar(hint: Any, value: Any) -> bool:
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:
        return hint is bool and isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer()
        )
    if hint is float:
        if isinstance(value, str):
            return _YAML_EXPONENT.fullmatch(value) is not None
        return isinstance(value, numbers.Real)
    return not isinstance(hint, type) or isinstance(value, hint)


_YAML_EXPONENT = re.compile(r"[+-]?(?:\d+|\d+\.\d*|\.\d+)[eE][+-]?\d+")
"""A number in exponent form that YAML 1.1 (PyYAML's ``safe_load``) leaves a string: ``1e-3``
(it wants ``1.0e-3``). Float fields take it as the number it means."""


_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
    list: "a list",
    type(None): "null",
}


def describe(hint: Any) -> str:
    """What ``hint`` expects, in words (``an integer``, ``one of ['sgd', 'adamw']``, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(member) for member in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else "a list"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    """``describe(hint)`` for several items: ``integers``, ``mappings of DataSource fields``."""
    words = describe(hint)
    article, _, rest = words.partition(" ")
    if article not in ("a", "an"):
        return words
    noun, _, tail = rest.partition(" ")
    return f"{noun}s {tail}".strip()
