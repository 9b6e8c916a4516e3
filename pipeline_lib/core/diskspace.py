"""A full disk, told apart from other write failures, with an error that names the folder and the space left."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class DiskFullError(OSError):
    """A file could not be written because its disk is full; the message names the file and the space left."""


LOW_SPACE_BYTES = 64 * 2**20  # below this after a failed write, the failure is taken for a full disk


def disk_full(error: BaseException, target: Path) -> DiskFullError | None:
    """A DiskFullError for a failed write of target, or None when the failure was something else.

    An OSError says ENOSPC itself; torch.save reports a full disk as a RuntimeError ("file write failed"), so any
    other failure counts when the disk has less than LOW_SPACE_BYTES left.
    """
    folder = Path(target).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        not isinstance(error, OSError) and free < LOW_SPACE_BYTES
    )
    if not full:
        return None
    return DiskFullError(
        errno.ENOSPC, f"no space left on the disk of {folder} ({free / 2**20:.0f} MiB free): free some space "
        "or move the workspace to a larger disk; nothing was written",
        str(target),
    )
