"""Typed JSON: stage results written and read back exactly; anything else refused with a RecordError, nothing run."""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from pipeline_lib.core.typed_json import RecordError, StoredError, check_type, dumps, loads, strict_json
from pipeline_lib.core.workspace import Ref


@dataclass(frozen=True)
class Output:
    catalog: Ref
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra: Ref | None = None


REGISTRY = {"Ref": Ref, "Output": Output}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _envelope(value: Any) -> bytes:
    return json.dumps({"format": "aidetect-typed-json", "version": 1, "value": value}).encode()


def test_values_come_back_exactly_with_their_types() -> None:
    values = [
        Output(Ref("catalog/a.parquet", "ab" * 32), {"ok": 3.0, "n": 2}, [{"k": None, "v": [1, "x"]}]),
        [(("sha", "store/ab/sha.png"),), (("sha2", "incoming/x.png"),)],  # chunks: tuples stay tuples
        (3, ["error one"]),
        {"nested": {"a": (1.5, None)}},
        None,
        "text",
    ]
    for value in values:
        assert loads(dumps(value, REGISTRY), REGISTRY) == value, value
    assert isinstance(loads(dumps([(1, 2)], REGISTRY), REGISTRY)[0], tuple)


def test_nan_numpy_scalars_and_errors_are_kept_as_plain_values() -> None:
    back = loads(dumps({"auc": float("nan"), "count": np.int64(7), "mean": np.float32(0.5)}, REGISTRY), REGISTRY)
    assert math.isnan(back["auc"]) and back["count"] == 7 and type(back["count"]) is int and back["mean"] == 0.5
    error = loads(dumps(FileNotFoundError("no such file: x.png"), REGISTRY), REGISTRY)
    assert isinstance(error, StoredError) and error.kind == "FileNotFoundError" and "x.png" in str(error)


def test_objects_outside_the_registry_are_not_written() -> None:
    with pytest.raises(TypeError, match="set is not in the registry"):
        dumps({"a": {1, 2}}, REGISTRY)
    with pytest.raises(TypeError, match="dict keys must be str"):
        dumps({1: "x"}, REGISTRY)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "not JSON"),
        (_envelope({"Output": {"catalog": {"Ref": {"path": "p", "digest": "d"}}}})[:-9], "not JSON"),  # truncated
        (b'{"format": "aidetect-typed-json", "format": "x", "version": 1, "value": 1}', "names a key twice"),
        (json.dumps({"version": 1, "value": 1}).encode(), "not a aidetect-typed-json record"),
        (json.dumps({"format": "other", "version": 1, "value": 1}).encode(), "format 'other'"),
        (_envelope({"__class__": "os.system", "data": "touch /tmp/x"}), "an object with keys"),
        (_envelope({"os.system": {}}), "unknown object 'os.system'"),
        (_envelope({"Output": {"catalog": {"Ref": {"path": "p", "digest": "d"}}}}), "expected \\['catalog', 'extra'"),
        (_envelope({"Ref": {"path": "p", "digest": 3}}), "Ref.digest: expected str, got int"),
        (_envelope({"Ref": {"path": "p", "digest": "d", "code": "x"}}), "Ref with fields"),
        (_envelope(_nested(40)), "nested deeper"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
        (pickle.dumps({"a": 1}), "not JSON"),
    ],
)
def test_anything_else_is_a_record_error_saying_what(blob: bytes, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        loads(blob, REGISTRY)


def test_a_field_of_the_wrong_type_is_refused_and_int_counts_as_float() -> None:
    ref = {"Ref": {"path": "p", "digest": "d"}}
    fields = {"catalog": ref, "metrics": {"dict": {"n": 2}}, "rows": [], "extra": None}
    assert loads(_envelope({"Output": fields}), REGISTRY).metrics == {"n": 2}
    for name, wrong in (("metrics", {"dict": {"n": "2"}}), ("rows", [1]), ("extra", "p"), ("catalog", None)):
        with pytest.raises(RecordError, match=f"Output.{name}"):
            loads(_envelope({"Output": fields | {name: wrong}}), REGISTRY)


def test_check_type_follows_the_annotation() -> None:
    check_type([(("a", "b"),)], list[tuple[tuple[str, str], ...]])
    check_type((1, ["x"]), tuple[int, list[str]])
    check_type(None, Ref | None)
    for value, hint in (([("a",)], list[tuple[str, str]]), ((1, ["x"]), tuple[int, list[int]]), (True, int)):
        with pytest.raises(RecordError):
            check_type(value, hint)


def test_strict_json_builds_only_plain_values() -> None:
    assert strict_json(b'{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}
    with pytest.raises(RecordError, match="names a key twice"):
        strict_json(b'{"a": 1, "a": 2}')
