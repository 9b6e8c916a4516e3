import hashlib

import pytest

from pipeline_lib.workspace import (
    Workspace,
    WorkspaceError,
    atomic_write_bytes,
    file_sha256,
    listing_digest,
    put_in_store,
    sync_files,
)


def test_create_then_open(tmp_path):
    created = Workspace.create(tmp_path / "w")
    assert Workspace.open(tmp_path / "w") == created
    assert created.store.is_dir() and created.quarantine.is_dir() and created.prefect.is_dir()


def test_open_missing_workspace_names_the_path(tmp_path):
    with pytest.raises(WorkspaceError, match=str(tmp_path / "missing")):
        Workspace.open(tmp_path / "missing")


def test_store_is_content_addressed_and_idempotent(workspace):
    sha, path = put_in_store(workspace, b"hello", "jpg")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert path == workspace.store / sha[:2] / f"{sha}.jpg" and path.read_bytes() == b"hello"
    mtime = path.stat().st_mtime_ns
    assert put_in_store(workspace, b"hello", "jpg") == (sha, path) and path.stat().st_mtime_ns == mtime


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    class Boom(Exception):
        pass

    from pipeline_lib.workspace import atomic_path

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Boom()
    assert target.read_bytes() == b"old", "a failed write must not replace the target"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary file may be left behind"


def test_batch_of_non_durable_writes_is_synced_once_per_folder(tmp_path):
    paths = [
        atomic_write_bytes(tmp_path / folder / f"{i}.bin", bytes([i]) * 10, durable=False)
        for i, folder in enumerate(["a", "a", "b"])
    ]
    paths[1].unlink()  # moved on before the sync (e.g. ingested): skipped
    assert sync_files(paths) == 2
    assert [p.read_bytes() for p in (paths[0], paths[2])] == [b"\x00" * 10, b"\x02" * 10]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["0.bin", "2.bin"], "no temporary files"


def test_ref_digest_matches_content(workspace):
    path = atomic_write_bytes(workspace.cache / "x.txt", b"abc")
    ref = workspace.ref(path)
    assert ref.path == "cache/x.txt" and ref.digest == file_sha256(path)


def test_listing_digest_changes_when_a_file_is_added(tmp_path):
    (tmp_path / "a").mkdir()
    before = listing_digest([tmp_path / "a"])
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    assert listing_digest([tmp_path / "a"]) != before
