import hashlib
import os
import signal

import pytest

from pipeline_lib.core.workspace import (
    Workspace,
    WorkspaceBusyError,
    WorkspaceError,
    atomic_write_bytes,
    check_unlocked,
    current_umask,
    file_sha256,
    listing_digest,
    lock_path,
    put_in_store,
    read_lock_holder,
    sync_files,
    workspace_lock,
)
from tests.conftest import hold_workspace_lock


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

    from pipeline_lib.core.workspace import atomic_path

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


# --------------------------------------------------------------------------------------------------------------
# Files under the user's umask, a store that repairs itself, one writer per workspace


def test_atomic_files_get_the_users_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        path = atomic_write_bytes(tmp_path / "shared.bin", b"x")
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
        os.umask(0o007)
        path = atomic_write_bytes(tmp_path / "team.bin", b"x")
        assert path.stat().st_mode & 0o777 == 0o660, oct(path.stat().st_mode)
    finally:
        os.umask(previous)


def test_a_damaged_store_file_is_rewritten(workspace):
    sha, path = put_in_store(workspace, b"hello world", "jpg")
    path.write_bytes(b"hello")  # truncated by a crash or by hand
    assert put_in_store(workspace, b"hello world", "jpg") == (sha, path)
    assert path.read_bytes() == b"hello world"


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(workspace):
    holder = hold_workspace_lock(workspace.root)
    try:
        with pytest.raises(WorkspaceBusyError) as info:
            with workspace_lock(workspace, "second"):
                pytest.fail("two writers in one workspace")
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "aidetect run (test holder)" in message and "since" in message
        with pytest.raises(WorkspaceBusyError, match=f"pid {holder.pid}"):
            check_unlocked(workspace)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_unlocked(workspace)
    with workspace_lock(workspace, "after the kill") as stale:
        assert stale is not None and stale.pid == holder.pid and stale.is_alive() is False
    with workspace_lock(workspace, "clean") as stale:
        assert stale is None, "a lock released normally leaves nothing to take over"


def test_a_lock_released_normally_lets_the_next_run_in(workspace):
    holder = hold_workspace_lock(workspace.root)
    holder.stdin.close()
    assert holder.wait() == 0
    with workspace_lock(workspace) as stale:
        assert stale is None


def test_a_workspace_path_that_cannot_hold_a_workspace_is_refused_at_open_and_create(tmp_path):
    from pipeline_lib.core.layout import UnusableWorkspaceError

    a_file = tmp_path / "ws.txt"
    a_file.write_text("x", encoding="utf-8")
    for make in (Workspace.create, Workspace.open):
        with pytest.raises(UnusableWorkspaceError, match="is a file, not a folder"):
            make(a_file)
    workspace = Workspace.create(tmp_path / "ws")
    workspace.cache.rmdir()
    workspace.cache.write_bytes(b"")
    for make in (Workspace.create, Workspace.open):
        with pytest.raises(UnusableWorkspaceError, match="keeps its cache/ folder"):
            make(workspace.root)
    workspace.cache.unlink()
    (workspace.root / ".aidetect-workspace").write_text("aidetect workspace v99\n", encoding="utf-8")
    for make in (Workspace.create, Workspace.open):
        with pytest.raises(UnusableWorkspaceError, match="layout v99"):
            make(workspace.root)
    assert not workspace.cache.exists(), "a refused workspace is not touched"


def test_the_lock_taken_again_by_its_holder_is_a_no_op_but_another_thread_is_refused(workspace):
    import threading

    refused: list[BaseException] = []

    def second_writer() -> None:
        try:
            with workspace_lock(workspace, "a thread of its own"):
                pass
        except WorkspaceBusyError as error:
            refused.append(error)

    with workspace_lock(workspace, "aidetect import (the command)"):
        with workspace_lock(workspace, "aidetect flow run (inside it)") as stale:
            assert stale is None
        other = threading.Thread(target=second_writer)  # a new thread does not share this command's hold
        other.start()
        other.join()
        holder = read_lock_holder(lock_path(workspace))
        assert holder is not None and holder.command == "aidetect import (the command)", "the inner block let go"
    assert len(refused) == 1 and "aidetect import (the command)" in str(refused[0])
    check_unlocked(workspace)

