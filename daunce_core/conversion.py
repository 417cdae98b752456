"""Config dataclasses from and to plain dicts (YAML, JSON), with errors that name the field."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from daunce_core.errors import DaunceError


def to_dict(value: Any) -> Any:
    """A config dataclass as plain dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; errors name the field (``where``) and the fix."""
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
        name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()
    }
    try:
        return cls(**values)
    except DaunceError as error:
        raise DaunceError(f"config field {where or '(top)'}: {error}") from error
    except TypeError as error:
        raise DaunceError(f"config field {where or '(top)'} is incomplete: {error}.") from error


def _item(cls: type, value: Any, where: str) -> Any:
    """A list item: a mapping, or a plain string for a dataclass whose ``from_name`` takes one."""
    if isinstance(value, str) and hasattr(cls, "from_name"):
        return cls.from_name(value)
    return from_dict(cls, value, where)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    if isinstance(value, list):
        for arg in (hint, *typing.get_args(hint)):
            inner = typing.get_args(arg)
            if typing.get_origin(arg) is list and inner and dataclasses.is_dataclass(inner[0]):
                return [_item(inner[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    for cls in (hint, *typing.get_args(hint)):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return value if value is None else from_dict(cls, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value
