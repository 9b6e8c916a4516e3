"""Typed JSON: small values (plain JSON, tuples, dicts, dataclasses of a registry, exceptions) written and read back
exactly, with nothing imported or run on reading.

A stage's result is stored this way (tasks/results.py) because a workspace may be shared: whoever can write a file
there must not be able to make the next reader run code, as a pickle (or a JSON format that names classes to
import) would. Reading accepts only this format: every JSON object is a one-key wrapper, ``{"tuple": [...]}``,
``{"dict": {...}}``, ``{"error": {"type": ..., "message": ...}}`` (read back as a StoredError, never the original
class) or ``{"<registered name>": {<every field>: ...}}``; a dataclass is built only from the registry the reader
passes in, with exactly its fields, each of its annotated type (check_type). Anything else is a RecordError saying
what is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "aidetect-typed-json"
VERSION = 1
MAX_DEPTH = 32  # stage results nest a few levels; a deeper record is not one of ours
_TUPLE, _DICT, _ERROR = "tuple", "dict", "error"
_SCALARS = (str, int, float, bool, type(None))


class RecordError(ValueError):
    """Bytes that are not a typed-JSON record of the expected schema; the message says what is wrong."""


Registry = Mapping[str, type]  # record name -> dataclass


class StoredError(Exception):
    """An exception read back from a record: the name of its type and its message, nothing else of it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def dumps(value: Any, registry: Registry) -> bytes:
    """The record of value (TypeError naming a value the format cannot hold: an object outside the registry)."""
    names = {cls: name for name, cls in registry.items()}
    if {_TUPLE, _DICT, _ERROR} & set(registry):
        raise ValueError(f"registry names {_TUPLE!r}, {_DICT!r} and {_ERROR!r} are reserved")
    envelope = {"format": FORMAT, "version": VERSION, "value": _encode(value, names, 0)}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")


def _encode(value: Any, names: Mapping[type, str], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.generic):  # numpy scalars of a computation: their Python value
        value = value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        return [_encode(item, names, depth + 1) for item in value]
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, names, depth + 1) for item in value]}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"dict keys must be str, got {sorted({type(k).__name__ for k in value})}")
        return {_DICT: {key: _encode(item, names, depth + 1) for key, item in value.items()}}
    if isinstance(value, BaseException):
        return {_ERROR: _error_fields(value)}
    name = names.get(type(value))
    if name is None:
        raise TypeError(f"{type(value).__name__} is not in the registry ({sorted(names.values())}) nor plain data")
    fields = dataclasses.fields(value)
    return {name: {field.name: _encode(getattr(value, field.name), names, depth + 1) for field in fields}}


def _error_fields(error: BaseException) -> dict[str, str]:
    if isinstance(error, StoredError):
        return {"type": error.kind, "message": error.message}
    return {"type": type(error).__name__, "message": str(error)}


def loads(blob: bytes, registry: Registry) -> Any:
    """The value of a record (RecordError naming what is wrong: not JSON, another format, an unknown object)."""
    envelope = strict_json(blob)
    if not isinstance(envelope, dict) or set(envelope) != {"format", "version", "value"}:
        raise RecordError(f"not a {FORMAT} record")
    if envelope["format"] != FORMAT or envelope["version"] != VERSION:
        raise RecordError(f"format {envelope['format']!r} version {envelope['version']!r}, not {FORMAT} {VERSION}")
    return _decode(envelope["value"], registry, 0)


def strict_json(blob: bytes) -> Any:
    """Plain JSON (no hooks, nothing built but dicts, lists and scalars); RecordError if it is not JSON or an object
    names a key twice (two parsers could read such a file two ways)."""
    try:
        return json.loads(blob, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"not JSON ({error})") from None
    except RecursionError:
        raise RecordError("JSON nested too deep") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; RecordError for a key given twice."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise RecordError("a JSON object names a key twice")
    return found


def _decode(node: Any, registry: Registry, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise RecordError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, _SCALARS):
        return node
    if isinstance(node, list):
        return [_decode(item, registry, depth + 1) for item in node]
    if len(node) != 1:
        raise RecordError(
            f"an object with keys {sorted(node)[:4]} (expected one of tuple, dict, error, {sorted(registry)})"
        )
    ((tag, payload),) = node.items()
    if tag == _TUPLE and isinstance(payload, list):
        return tuple(_decode(item, registry, depth + 1) for item in payload)
    if tag == _DICT and isinstance(payload, dict):
        return {key: _decode(item, registry, depth + 1) for key, item in payload.items()}
    if tag == _ERROR and isinstance(payload, dict) and set(payload) == {"type", "message"}:
        if isinstance(payload["type"], str) and isinstance(payload["message"], str):
            return StoredError(payload["type"], payload["message"])
    if tag in registry and isinstance(payload, dict):
        return _build(registry[tag], payload, registry, depth)
    raise RecordError(f"unknown object {tag!r} (known: tuple, dict, error, {', '.join(sorted(registry))})")


def _build(cls: type, payload: dict[str, Any], registry: Registry, depth: int) -> Any:
    """An instance of a registered dataclass from exactly its fields, each checked against its annotation."""
    hints = field_types(cls)
    if set(payload) != set(hints):
        raise RecordError(f"{cls.__name__} with fields {sorted(payload)}, expected {sorted(hints)}")
    values = {name: _decode(item, registry, depth + 1) for name, item in payload.items()}
    for name, value in values.items():
        check_type(value, hints[name], f"{cls.__name__}.{name}")
    return cls(**values)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls) if field.init}


def check_type(value: Any, hint: Any, where: str = "value") -> None:
    """RecordError unless value is of the annotated type: plain types, X | None, list, tuple, dict, dataclasses, Any.

    An int is accepted for float (JSON writes 1.0 as 1.0, yet counts kept as floats may be ints); bool is not int.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_type(value, option, where)
            except RecordError:
                continue
        raise RecordError(f"{where}: {type(value).__name__} is none of {args}")
    if origin is not None:
        return _check_container(value, origin, args, where)
    if not _is_instance(value, hint):
        raise RecordError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is None or hint is type(None):
        return value is None
    return isinstance(hint, type) and isinstance(value, hint)


def _check_container(value: Any, origin: Any, args: tuple[Any, ...], where: str) -> None:
    if origin is list and isinstance(value, list):
        for index, item in enumerate(value):
            check_type(item, args[0] if args else Any, f"{where}[{index}]")
    elif origin is tuple and isinstance(value, tuple):
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not variadic and args and len(args) != len(value):
            raise RecordError(f"{where}: a tuple of {len(value)}, expected {len(args)}")
        for index, item in enumerate(value):
            check_type(item, args[0] if variadic else args[index] if args else Any, f"{where}[{index}]")
    elif origin is dict and isinstance(value, dict):
        for key, item in value.items():
            check_type(key, args[0] if args else Any, f"{where} key")
            check_type(item, args[1] if args else Any, f"{where}[{key!r}]")
    else:
        raise RecordError(f"{where}: expected {origin.__name__}, got {type(value).__name__}")
