"""Stage results in the workspace are typed JSON: planted, damaged or lost result files run no code and only make
their stage run again (one warning each), on the next plain run.

Whoever plants a file writes all of it: Prefect's record of a result names the serializer to read it with, so each
planted record names Prefect's own pickle or JSON serializer, and its payload would run code (write a marker file)
if Prefect read it. The test first shows the payloads are armed (Prefect's serializer, called here on a copy, writes
the control marker), then that a run leaves the real marker absent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer, Serializer
from pydantic import BaseModel, field_validator

from flows.pipeline import crawl_flow, pipeline
from pipeline_lib.core import typed_json
from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping
from pipeline_lib.core.workspace import Ref
from pipeline_lib.ops import demo_data
from tasks import per_image, stages
from tasks.results import SERIALIZER_TYPE, StageResultSerializer, accepted_record, return_type
from tests.conftest import make_image
from tests.flows.test_cache_matrix import TINY

DEMO_YAML = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


class Armed(BaseModel):
    """What a JSON payload with a class hint makes Prefect's JSON serializer build: building it writes a file."""

    marker: str

    @field_validator("marker")
    @classmethod
    def _touch(cls, value: str) -> str:
        Path(value).touch()
        return value


class _Touch:
    """What a pickle payload holds: unpickling it writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _pickle_payload(marker: Path) -> tuple[Serializer, bytes]:
    serializer = PickleSerializer()
    return serializer, serializer.dumps(_Touch(marker))


def _json_payload(marker: Path) -> tuple[Serializer, bytes]:
    serializer = JSONSerializer()  # Prefect's default object_decoder imports and builds what "__class__" names
    return serializer, f'{{"__class__": "{__name__}.Armed", "data": {{"marker": "{marker}"}}}}'.encode()


def _assert_armed(payload: Any, tmp_path: Path) -> None:
    """Prefect reading this payload with the serializer its record names runs code (the control marker appears)."""
    control = tmp_path / "control-marker"
    serializer, blob = payload(control)
    ResultRecord.deserialize_from_result_and_metadata(result=blob, metadata=_metadata(serializer, control))
    assert control.exists(), "the planted payload is not armed: the test would prove nothing"
    control.unlink()


def _metadata(serializer: Serializer, result: Path) -> bytes:
    return ResultRecordMetadata(storage_key=str(result), serializer=serializer).dump_bytes()


def _folder_config(tmp_path: Path) -> Any:
    for index in range(4):
        make_image(tmp_path / "ai" / f"prompt-{index}" / "v.png", seed=index, size=(64, 64), fmt="PNG")
    data = {
        "sources": {"folders": [{"path": str(tmp_path / "ai"), "label": "ai"}]},
        "execution": {"workspace": str(tmp_path / "ws"), "chunk_size": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics_interval_s": 0},
    }
    return build_config(data, origin="test")


def _ingest_results(root: Path) -> dict[str, Path]:
    """The ingest's result files by what they hold: plan, merge, chunk-0 ... chunk-3."""
    found: dict[str, Path] = {}
    chunks = 0
    for path in sorted((root / "prefect" / "results").iterdir()):
        text = path.read_text(encoding="utf-8")
        if '"StageResult"' in text:
            found["merge"] = path
        elif "incoming/" in text:
            found["plan"] = path
        else:
            found[f"chunk-{chunks}"] = path
            chunks += 1
    return found


def _plant(result: Path, payload: tuple[Serializer, bytes]) -> None:
    """A whole planted result: the payload and Prefect's record of it naming the payload's serializer."""
    serializer, blob = payload
    result.write_bytes(blob)
    (result.parent.parent / "keys" / result.name).write_bytes(_metadata(serializer, result))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tasks.results" and r.levelno == logging.WARNING]


@pytest.mark.slow
def test_planted_and_damaged_results_run_no_code_and_their_tasks_run_again(
    harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    config = _folder_config(tmp_path)
    first = crawl_flow(config)
    root = tmp_path / "ws"
    results = _ingest_results(root)
    assert set(results) == {"plan", "merge", "chunk-0", "chunk-1", "chunk-2", "chunk-3"}, sorted(results)
    marker = tmp_path / "marker"
    for payload in (_pickle_payload, _json_payload):
        _assert_armed(payload, tmp_path)
    _plant(results["merge"], _pickle_payload(marker))  # a record naming Prefect's pickle serializer, with a pickle
    _plant(results["chunk-0"], _json_payload(marker))  # naming Prefect's JSON serializer, with a class to build
    old = results["chunk-1"]  # what an older aidetect left: one file, Prefect's record with the pickle inside
    old.write_bytes(
        ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer()), result=_Touch(marker)).serialize()
    )
    (root / "prefect" / "keys" / old.name).unlink()
    good = results["chunk-2"].read_bytes()
    results["chunk-2"].write_bytes(good[: len(good) // 2])  # truncated (a crash, a full disk)
    results["chunk-3"].unlink()  # lost

    caplog.clear()
    again = crawl_flow(config)
    assert not marker.exists(), "a planted result ran code"
    warnings = _warnings(caplog)
    damaged = [path for kind, path in results.items() if kind != "plan"]
    assert len(warnings) == len(damaged), warnings
    for path in damaged:
        assert sum(str(path) in line and "the task runs again" in line for line in warnings) == 1, (path, warnings)
        assert json.loads(path.read_bytes())["format"] == typed_json.FORMAT, f"{path} was not written again"
    for reason in ("serializer 'pickle'", "serializer 'json'", "without a record", "not JSON", "file is missing"):
        assert any(reason in line for line in warnings), (reason, warnings)
    assert again["states"] == {"crawl": "Completed", "ingest": "Completed"}, again["states"]
    assert again["catalog"] == first["catalog"], "the recomputed ingest wrote another catalog"

    caplog.clear()
    assert crawl_flow(config)["states"]["ingest"] == "Cached", "the rewritten results are not used"
    assert not _warnings(caplog)


def test_every_cached_task_declares_the_return_type_its_stored_result_is_checked_against() -> None:
    found = {name: obj for module in (stages, per_image) for name, obj in vars(module).items() if isinstance(obj, Task)}
    cached = {name: task for name, task in found.items() if task.cache_policy is not NO_CACHE}
    assert len(cached) >= 12, sorted(cached)
    undeclared = [name for name, task in cached.items() if return_type(task.fn) is Any]
    assert not undeclared, f"tasks without a return annotation: any typed-JSON value would pass for them: {undeclared}"
    check_type = typed_json.check_type
    check_type([(("a" * 64, "store/aa/x.png"),)], return_type(per_image.plan_ingest.fn))
    check_type((2, ["x.png: truncated"]), return_type(per_image.tensor_chunk.fn))
    with pytest.raises(typed_json.RecordError, match="result"):
        check_type([{"ok": True}], return_type(stages.dedup.fn), "result")


def test_the_reader_passes_on_only_its_own_record_rebuilt(tmp_path: Path) -> None:
    result = tmp_path / "results" / ("ab" * 32)
    result.parent.mkdir()
    result.write_bytes(StageResultSerializer().dumps(Ref("catalog/x.parquet", "cd" * 32)))
    own = _metadata(StageResultSerializer(), tmp_path / "elsewhere")
    rebuilt = ResultRecordMetadata.load_bytes(accepted_record(own, result, Ref))
    assert rebuilt.storage_key == str(result) and rebuilt.serializer.type == SERIALIZER_TYPE
    refused = {
        "pickle": _metadata(PickleSerializer(), result),
        "json": _metadata(JSONSerializer(), result),
        "key named twice": own[:-1] + b',"serializer":{"type":"pickle"}}',
        "not JSON": own[:-5],
        "expiry": own.replace(b'"expiration":null', b'"expiration":"2999-01-01T00:00:00Z"'),
        "another type": own,
    }
    for case, content in refused.items():
        with pytest.raises(typed_json.RecordError):
            accepted_record(content, result, str if case == "another type" else Ref)


def _demo_config(tmp_path: Path, endpoint: str, dataset: demo_data.DemoDataset) -> Any:
    data = merge_mappings(read_yaml_mapping(DEMO_YAML), demo_data.demo_config_dict(dataset, endpoint, tmp_path / "ws"))
    data = merge_mappings(data, {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    return build_config(data, TINY, origin="test")


@pytest.mark.slow
def test_a_run_after_losing_half_the_results_succeeds_without_refresh(
    harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Issue 24 item 9: 8 result files deleted and 1 truncated. The ingest plan kept in the cache names files in
    incoming/ that its merge has moved to store/ since: its lost validation chunk runs again on the stored copies."""
    dataset = demo_data.generate_demo_dataset(tmp_path / "data", n_persons_per_class=4, image_size=32, seed=5)
    with demo_data.search_site(dataset) as endpoint:
        config = _demo_config(tmp_path, endpoint, dataset)
        first = pipeline(config)
        texts = {path: path.read_text(encoding="utf-8") for path in (tmp_path / "ws" / "prefect" / "results").iterdir()}
        validated = [path for path, text in texts.items() if '"ok":' in text]  # ingest's validation chunk
        plan = next(path for path, text in texts.items() if "incoming/" in text)
        truncated = next(path for path, text in texts.items() if '"dedup.exact"' in text)
        others = sorted(path for path in texts if path not in {*validated, plan, truncated})
        lost = [*validated, *others][:8]
        assert len(validated) == 1 and len(lost) == 8, sorted(texts.values())
        for path in lost:
            path.unlink()
        truncated.write_bytes(truncated.read_bytes()[:20])
        caplog.clear()
        again = pipeline(config)  # exited 2 with FileNotFoundError for a file in incoming/ before
        warnings = _warnings(caplog)
        third = pipeline(config)
    named = [path for path in [*lost, truncated] if any(str(path) in line for line in warnings)]
    assert len(warnings) == len(named) and {validated[0], truncated} <= set(named), warnings  # one line per file
    assert again["data_version"] == first["data_version"], "the recomputed stages made another data version"
    assert again["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    cached = {stage: "Completed" if stage == "crawl" else "Cached" for stage in third["states"]}
    assert third["states"] == cached, third["states"]
