"""A full disk while writing through atomic_path: a specific error, and the previous file kept."""

import errno
import shutil

import pytest

from pipeline_lib.core import diskspace
from pipeline_lib.core.diskspace import DiskFullError
from pipeline_lib.core.workspace import atomic_path, atomic_write_bytes


def test_a_full_disk_is_named_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "models" / "last.pt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(DiskFullError, match="no space left on the disk of .*models.*MiB free") as raised:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(target) and raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_a_library_write_error_counts_as_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a RuntimeError: the free space decides, so other errors keep their own."""
    target = tmp_path / "last.pt"
    torch_error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(RuntimeError, match="file write failed"):
        with atomic_path(target):
            raise torch_error
    real = shutil.disk_usage(tmp_path)
    usage, total = type(real), real.total
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda _: usage(total, total, 1024))
    with pytest.raises(DiskFullError, match="0 MiB free") as raised:
        with atomic_path(target):
            raise torch_error
    assert raised.value.__cause__ is torch_error and not target.exists()
