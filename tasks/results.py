"""Stage results in the workspace as typed JSON, never pickles: Prefect's serializer and key storage for them.

Prefect keeps a cached task's result under its cache key: the result file (workspace/prefect/results/<key>) and a
record of it (workspace/prefect/keys/<key>) naming the serializer to read it with. Prefect trusts that name, so a
record naming its pickle serializer (or its JSON serializer, which imports the classes a file names) runs code
when read. Every read goes through StageRecordStorage, which passes a record on only if this module could have
written it: StageResultSerializer named, and a result file of typed JSON (pipeline_lib.core.typed_json) of the
reading task's return type. Anything else is refused before Prefect parses it; Prefect then finds no result under
that key and the task runs again, with one warning naming the task and the file, and its new result replaces
the refused one.
"""

from __future__ import annotations

import functools
import importlib
import logging
import typing
from pathlib import Path
from typing import Any, ClassVar

from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultRecordMetadata
from prefect.serializers import Serializer
from pydantic import Field

from pipeline_lib.core import typed_json
from pipeline_lib.core.workspace import Ref, atomic_write_bytes

log = logging.getLogger(__name__)

SERIALIZER_TYPE = "aidetect-typed-json"
_METADATA_KEYS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


@functools.cache
def result_types() -> dict[str, type]:
    """The registry of types a stage result may hold: Ref and the stage outputs of tasks.stages."""
    from tasks import stages  # tasks.stages imports tasks.caching, which imports this module

    return {
        "Ref": Ref,
        "StageResult": stages.StageResult,
        "TrainOutput": stages.TrainOutput,
        "EvalOutput": stages.EvalOutput,
    }


class StageResultSerializer(Serializer):
    """Prefect serializer of stage results: typed JSON of result_types(); no settings a file could set."""

    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        """The typed-JSON record of a task's return value."""
        return typed_json.dumps(obj, result_types())

    def loads(self, blob: bytes) -> Any:
        """The value of a typed-JSON record (typed_json.RecordError for anything else)."""
        return typed_json.loads(blob, result_types())


class StageRecordStorage(LocalFileSystem):
    """Prefect's key storage (CachePolicy.key_storage) for stage results: one record per cache key naming the
    serializer and the result file. Reads only records this module wrote, of results it can read; writes atomically.

    results: the folder of the result files (Prefect's result storage), one per cache key, named by the key.
    """

    _block_type_name: ClassVar[str] = "aidetect stage records"
    results: str

    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """The record at path as Prefect may read it; FileNotFoundError when neither it nor its result file exists
        (a key never computed), RecordError (and one warning) when either is not what this module writes."""
        record, result = self._resolve_path(path), Path(self.results) / Path(path).name
        try:
            return accepted_record(_read_record(record, result), result, expected_return())
        except FileNotFoundError:
            raise
        except Exception as error:  # a RecordError, or one that is not the file's fault (unreadable, a bug): said
            reason = str(error) if isinstance(error, typed_json.RecordError) else f"{type(error).__name__}: {error}"
            log.warning("%s: stored result %s is not used (%s); the task runs again", _task_name(), result, reason)
            raise

    async def aread_path(self, path: str) -> bytes:
        """read_path (Prefect's async engine calls this one)."""
        return self.read_path(path)

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        """Write the record atomically (never a partial file at path); its absolute path."""
        return str(atomic_write_bytes(self._resolve_path(path), content))

    async def awrite_path(self, path: str, content: bytes) -> str:
        """write_path (Prefect's async engine calls this one)."""
        return self.write_path(path, content)


def _read_record(record: Path, result: Path) -> bytes:
    """The record's bytes; RecordError for a result file without a record (an older aidetect kept its pickled results
    in one file per key, with no record; or a write stopped between the result and its record)."""
    try:
        return record.read_bytes()
    except FileNotFoundError:
        if result.exists():
            raise typed_json.RecordError(
                f"a result file without a record in {record.parent}: an older aidetect's pickle or an interrupted write"
            ) from None
        raise


def accepted_record(content: bytes, result: Path, returns: Any = Any) -> bytes:
    """The record rebuilt (what Prefect parses is what was checked here); RecordError unless content is Prefect's
    record of a result naming StageResultSerializer, with no expiry and no storage block, and the result file holds
    typed JSON of type returns."""
    metadata = typed_json.strict_json(content)
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_KEYS:
        raise typed_json.RecordError("not Prefect's record of a result")
    if metadata.get("serializer") != {"type": SERIALIZER_TYPE}:
        raise typed_json.RecordError(f"serializer {_serializer_name(metadata)}, not {SERIALIZER_TYPE!r}")
    if metadata.get("expiration") is not None or metadata.get("storage_block_id") is not None:
        raise typed_json.RecordError("a record with an expiry or a storage block, which aidetect never writes")
    try:
        value = typed_json.loads(result.read_bytes(), result_types())
    except FileNotFoundError:
        raise typed_json.RecordError("the result file is missing") from None
    typed_json.check_type(value, returns, "result")
    return ResultRecordMetadata(storage_key=str(result), serializer=StageResultSerializer()).dump_bytes()


def _serializer_name(metadata: dict[str, Any]) -> str:
    serializer = metadata.get("serializer")
    return repr(serializer.get("type")) if isinstance(serializer, dict) else repr(serializer)


def expected_return() -> Any:
    """The return annotation of the task run in progress (Any outside a task run or without one)."""
    context = TaskRunContext.get()
    return Any if context is None else return_type(context.task.fn)


def return_type(fn: Any) -> Any:
    """A task function's resolved return annotation (Any without one), read in its module's namespace: a function
    that a Dask worker received by value carries only the globals its body uses."""
    return typing.get_type_hints(fn, globalns=vars(importlib.import_module(fn.__module__))).get("return", Any)


def _task_name() -> str:
    context = TaskRunContext.get()
    return "a stage task" if context is None else f"task {context.task.name!r}"
