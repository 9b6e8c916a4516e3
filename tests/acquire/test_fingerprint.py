"""Fingerprints of catalog images: the per-sha cache, unhashable files, algorithms, the process pool."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.acquire import fingerprint, jobs
from pipeline_lib.acquire.fingerprint import cache_path, fingerprint_catalog, fingerprint_catalog_with_stats
from pipeline_lib.acquire.hashing import hash_pair
from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.workspace import Workspace, put_in_store
from tests.acquire.test_hashing import encode, smooth
from tests.project_copy import copy_project, digest_in, edit


def store(workspace: Workspace, data: bytes, ext: str, **fields: object) -> dict[str, object]:
    """Put bytes in the store and return a catalog record for them."""
    sha, path = put_in_store(workspace, data, ext)
    record = {"sha256": sha, "path": workspace.relative(path), "label": "real", "group": "g", "status": "ok"}
    record.update(fields)
    return record


def catalog_of(workspace: Workspace, n: int, start: int = 0) -> pd.DataFrame:
    return new_rows(store(workspace, encode(smooth((64, 48), seed), "PNG"), "png") for seed in range(start, start + n))


def test_catalog_fills_ok_rows_and_hashes_each_sha_once(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    twice = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    invalid = new_rows([{"sha256": "f" * 64, "path": "quarantine/x.jpg", "label": "ai", "status": "invalid:truncated"}])
    result = fingerprint_catalog_with_stats(workspace, pd.concat([twice, invalid], ignore_index=True), "phash", 8)
    out = result.catalog
    assert (result.n_hashed, result.n_cached, result.n_unhashable) == (3, 0, 0)
    assert list(out["status"]) == ["ok"] * 4 + ["invalid:truncated"]
    assert (out["phash"].iloc[:4].str.len() == 16).all() and (out["dhash"].iloc[:4].str.len() == 16).all()
    assert out["phash"].iloc[0] == out["phash"].iloc[3]
    assert out["phash"].iloc[4] == "" and out["dhash"].iloc[4] == ""
    expected = hash_pair(workspace.root / out["path"].iloc[1], "phash", 8)
    assert (out["phash"].iloc[1], out["dhash"].iloc[1]) == expected


def test_cache_is_reused_and_extended(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    first = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    cache = cache_path(workspace, "phash", 8)
    assert cache == workspace.cache / "hashes" / f"phash-8-{fingerprint.hash_code()}.parquet"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    again = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    assert (again.n_hashed, again.n_cached) == (0, 3)
    assert cache.stat().st_mtime_ns == mtime  # nothing new: the cache is not rewritten
    pd.testing.assert_frame_equal(again.catalog, first.catalog)
    grown = pd.concat([table, catalog_of(workspace, 2, start=10)], ignore_index=True)
    more = fingerprint_catalog_with_stats(workspace, grown, "phash", 8)
    assert (more.n_hashed, more.n_cached) == (2, 3)
    assert sorted(pd.read_parquet(cache)["sha256"]) == sorted(grown["sha256"])
    assert not list(cache.parent.glob("*.part"))


def test_cached_hashes_are_used_without_reading_images(workspace: Workspace) -> None:
    table = catalog_of(workspace, 2)
    first = fingerprint_catalog(workspace, table, "phash", 8)
    for path in table["path"]:
        (workspace.root / path).unlink()  # a re-run must not need the files again
    assert list(fingerprint_catalog(workspace, table, "phash", 8)["phash"]) == list(first["phash"])


def test_unreadable_cache_is_rebuilt(workspace: Workspace) -> None:
    table = catalog_of(workspace, 2)
    cache = cache_path(workspace, "phash", 8)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not parquet")
    result = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    assert result.n_hashed == 2
    assert len(pd.read_parquet(cache)) == 2


def test_corrupt_file_at_hash_time_becomes_unhashable(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    broken = workspace.root / table["path"].iloc[1]
    broken.write_bytes(broken.read_bytes()[:40])  # damaged after validation
    (workspace.root / table["path"].iloc[2]).unlink()  # gone after validation
    result = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    status = list(result.catalog["status"])
    assert status[0] == "ok" and result.catalog["phash"].iloc[0] != ""
    assert status[1].startswith("invalid:unhashable:") and status[1] != "invalid:unhashable:"
    assert status[2] == "invalid:unhashable:FileNotFoundError"
    assert result.catalog["phash"].iloc[1] == "" and result.n_unhashable == 2
    assert list(pd.read_parquet(cache_path(workspace, "phash", 8))["sha256"]) == [table["sha256"].iloc[0]]


def test_algorithm_switch_uses_its_own_cache(workspace: Workspace) -> None:
    table = catalog_of(workspace, 4)
    by_algorithm = {name: fingerprint_catalog(workspace, table, name, 8) for name in ("phash", "whash", "ahash")}
    assert by_algorithm["phash"]["phash"].tolist() != by_algorithm["ahash"]["phash"].tolist()
    assert by_algorithm["phash"]["phash"].tolist() != by_algorithm["whash"]["phash"].tolist()
    for frame in by_algorithm.values():  # the second opinion is the same dhash whatever the algorithm
        assert frame["dhash"].tolist() == by_algorithm["phash"]["dhash"].tolist()
    names = sorted(p.name for p in (workspace.cache / "hashes").iterdir())
    assert names == [f"{name}-8-{fingerprint.hash_code()}.parquet" for name in ("ahash", "phash", "whash")]
    larger = fingerprint_catalog(workspace, table, "phash", 16)
    assert (larger["phash"].str.len() == 64).all()


def test_process_pool_matches_sequential(workspace: Workspace, monkeypatch) -> None:
    n = 24
    monkeypatch.setattr(jobs, "WORKER_STARTUP_S", 0.0)  # the pool always pays: it is what is tested here
    monkeypatch.setattr(jobs, "idle_cores", lambda: 2.0)
    table = catalog_of(workspace, n)
    broken = workspace.root / table["path"].iloc[5]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    parallel = fingerprint_catalog_with_stats(workspace, table, "dhash", 8, workers=2)
    sequential = fingerprint_catalog_with_stats(workspace, table, "dhash", 8, workers=1)
    assert parallel.n_hashed == n - 1 and parallel.n_unhashable == 1
    assert sequential.n_hashed == 0 and sequential.n_cached == n - 1
    pd.testing.assert_frame_equal(parallel.catalog, sequential.catalog)
    assert parallel.catalog["status"].iloc[5].startswith("invalid:unhashable:")


def test_planned_chunks_hash_and_merge_like_the_one_call(workspace: Workspace) -> None:
    table = catalog_of(workspace, 5)
    twice = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    fingerprint_catalog(workspace, table.iloc[:2], "phash", 8)  # two already cached
    jobs = fingerprint.missing_hash_jobs(workspace, twice, "phash", 8)
    assert [sha for sha, _ in jobs] == list(table["sha256"].iloc[2:])
    assert all(not Path(path).is_absolute() for _, path in jobs)
    chunks = fingerprint.chunked(jobs, 2)
    assert [len(chunk) for chunk in chunks] == [2, 1]
    rows = [row for chunk in chunks for row in fingerprint.hash_jobs(workspace, chunk, "phash", 8)]
    assert all(error == "" for *_, error in rows)
    merged, stats = fingerprint.merge_hash_rows(workspace, twice, rows, "phash", 8)
    assert stats == {"hashed": 3, "cached": 2, "unhashable": 0}
    expected = [hash_pair(workspace.root / path, "phash", 8) for path in twice["path"]]
    assert list(zip(merged["phash"], merged["dhash"], strict=True)) == expected
    assert fingerprint.missing_hash_jobs(workspace, twice, "phash", 8) == []
    with pytest.raises(ValueError, match="chunk size"):
        fingerprint.chunked(jobs, 0)


def test_merge_records_unhashable_rows_and_hashes_what_the_plan_missed(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    jobs = fingerprint.missing_hash_jobs(workspace, table, "phash", 8)
    (workspace.root / jobs[1][1]).write_bytes(b"garbage")  # damaged after validation
    rows = fingerprint.hash_jobs(workspace, jobs[:2], "phash", 8)  # the third image is not in any chunk
    assert rows[1][3] != "" and rows[1][1] == ""
    merged, stats = fingerprint.merge_hash_rows(workspace, table, rows, "phash", 8)
    assert stats == {"hashed": 2, "cached": 0, "unhashable": 1}
    assert merged["status"].iloc[1].startswith("invalid:unhashable:")
    assert merged["phash"].iloc[2] == hash_pair(workspace.root / table["path"].iloc[2])[0]
    assert sorted(pd.read_parquet(cache_path(workspace, "phash", 8))["sha256"]) == sorted(
        table["sha256"].iloc[[0, 2]]
    )


HASHING = "pipeline_lib/acquire/hashing.py"
FUTURE = "from __future__ import annotations"


def test_the_hash_cache_is_named_by_the_code_that_computes_the_hashes(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    before = digest_in(root, *fingerprint.HASH_PRODUCERS)
    assert fingerprint.hash_code() == before[:16], "the copy holds the checkout's code: the same digest"
    edit(root, HASHING, "return low > np.median(low)", "return low >= np.median(low)")
    assert digest_in(root, *fingerprint.HASH_PRODUCERS) != before, "a real change of phash must rename the cache"
    edit(root, HASHING, "return low >= np.median(low)", "return low > np.median(low)  # back")
    edit(root, HASHING, "def dhash_bits(luma: np.ndarray, hash_size: int)", "def dhash_bits(luma: object, hash_size)")
    edit(root, HASHING, '"""The perceptual hash of one image file', '"""The hash of one image file')
    edit(root, "pipeline_lib/acquire/fingerprint.py", 'UNHASHABLE = "unhashable"', 'UNHASHABLE = "cannot-hash"')
    edit(root, "pipeline_lib/curate/dedup.py", FUTURE, FUTURE + "\nX = 1")
    assert digest_in(root, *fingerprint.HASH_PRODUCERS) == before, (
        "comments, docstrings, annotations, the cache's own bookkeeping and modules the hashing never reaches must "
        "not rename the cache (every image would be hashed again)"
    )
    edit(root, "pipeline_lib/acquire/validate.py", FUTURE, FUTURE + "\nX = 1")
    assert digest_in(root, *fingerprint.HASH_PRODUCERS) != before, "ingest hashes from validate's decode: it counts"
