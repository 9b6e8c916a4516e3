import pandas as pd
import pytest

from pipeline_lib.core.catalog import (
    COLUMNS,
    CatalogError,
    conform,
    counts,
    empty_catalog,
    new_rows,
    read_parquet_file,
    read_snapshot,
    write_snapshot,
)


def _rows():
    now = pd.Timestamp("2026-01-01", tz="UTC")
    return new_rows(
        [
            {"sha256": "a" * 64, "label": "real", "group": "p1", "fetched_at": now, "status": "ok", "split": "train"},
            {"sha256": "b" * 64, "label": "ai", "group": "p2", "fetched_at": now, "status": "invalid:truncated"},
        ]
    )


def test_empty_catalog_has_the_schema():
    frame = empty_catalog()
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 0


def test_snapshot_round_trip_and_same_content_same_ref(workspace):
    ref = write_snapshot(workspace, "ingest", _rows())
    assert ref == write_snapshot(workspace, "ingest", _rows()), "equal tables must give the same snapshot"
    back = read_snapshot(workspace, ref)
    pd.testing.assert_frame_equal(back, _rows())


def test_tampered_snapshot_is_detected(workspace):
    ref = write_snapshot(workspace, "ingest", _rows())
    ref.resolve(workspace).write_bytes(b"garbage")
    with pytest.raises(CatalogError, match="changed on disk"):
        read_snapshot(workspace, ref)


def test_a_truncated_snapshot_is_rewritten_when_the_stage_writes_it_again(workspace):
    ref = write_snapshot(workspace, "ingest", _rows())
    path = ref.resolve(workspace)
    path.write_bytes(path.read_bytes()[:100])  # what a crash or a full disk leaves
    with pytest.raises(CatalogError, match="changed on disk"):
        read_snapshot(workspace, ref)
    assert write_snapshot(workspace, "ingest", _rows()) == ref
    pd.testing.assert_frame_equal(read_snapshot(workspace, ref), _rows())


def test_a_damaged_parquet_file_is_a_catalog_error_naming_it(tmp_path):
    path = tmp_path / "dedup-0123.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(CatalogError, match="dedup-0123.parquet is damaged"):
        read_parquet_file(path)


def test_label_other_than_real_or_ai_is_rejected():
    with pytest.raises(CatalogError, match="label must be one of"):
        new_rows([{"sha256": "c" * 64, "label": "fake", "status": "ok"}])


def test_missing_and_unknown_columns():
    with pytest.raises(CatalogError, match="missing columns"):
        conform(pd.DataFrame({"sha256": ["x"]}))
    with pytest.raises(CatalogError, match="unknown columns: oops"):
        conform(_rows().assign(oops=1))


def test_counts():
    result = counts(_rows())
    assert result["status"] == {"invalid": 1, "ok": 1}
    assert result["label"] == {"real": 1} and result["split"] == {"train": 1}
