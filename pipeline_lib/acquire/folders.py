"""Folder imports: a folder's images copied into incoming/ (the user's files are only read), grouped by one of
three rules (group_by): `folder` (the first sub-folder, else the file's stem), `pattern:<regex>` (the first
group of a match on the file name, else the whole match) or `csv:<file>` (a file,group[,generator] table).
Every other file is logged once with the reason it was left out."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline_lib.acquire.crawl_state import CrawlState
from pipeline_lib.acquire.local_files import FolderEntry, folder_entries, open_inside
from pipeline_lib.acquire.sources import clean_keyword, read_utf8
from pipeline_lib.acquire.validate import not_an_image
from pipeline_lib.core.config import FolderSource
from pipeline_lib.core.progress import progress
from pipeline_lib.core.workspace import bytes_sha256

GroupOf = Callable[[Path], tuple[str, str]]  # file -> (group, error)


def _group_by_folder(root: Path) -> GroupOf:
    def group_of(path: Path) -> tuple[str, str]:
        parts = path.relative_to(root).parts
        return (parts[0] if len(parts) > 1 else path.stem), ""

    return group_of


def _group_by_pattern(pattern: str, where: str) -> GroupOf:
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{where}: invalid regular expression {pattern!r} ({error})") from None

    def group_of(path: Path) -> tuple[str, str]:
        match = regex.search(path.name)
        group = (match.group(1) if regex.groups else match.group(0)) if match else None
        return (group, "") if group else ("", "group pattern did not match")

    return group_of


def read_group_table(path: Path) -> dict[str, tuple[str, str]]:
    """file (relative to the folder, POSIX) -> (group, generator) from a CSV with columns file,group[,generator].

    generator is "" where the optional column is absent or the cell is empty (the folder's generator applies).
    """
    reader = csv.DictReader(io.StringIO(read_utf8(path, "group CSV")))
    missing = [c for c in ("file", "group") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{path}, line 1: missing column(s) {', '.join(missing)} (header must be file,group[,generator])"
        )
    table: dict[str, tuple[str, str]] = {}
    for row in reader:
        file, group = (row.get("file") or "").strip(), clean_keyword(row.get("group") or "")
        if not file or not group:
            raise ValueError(f"{path}, line {reader.line_num}: empty file or group")
        table[PurePosixPath(Path(file).as_posix()).as_posix()] = (group, clean_keyword(row.get("generator") or ""))
    return table


def read_group_csv(path: Path, root: Path) -> dict[str, str]:
    """file (relative to root, POSIX) -> group from a CSV with columns file,group[,generator]."""
    return {file: group for file, (group, _) in read_group_table(path).items()}


def _group_csv_path(spec: str, root: Path) -> Path:
    csv_path = Path(spec)
    return csv_path if csv_path.is_absolute() else root / csv_path


def _group_by_csv(spec: str, root: Path) -> GroupOf:
    csv_path = _group_csv_path(spec, root)
    groups = read_group_csv(csv_path, root)

    def group_of(path: Path) -> tuple[str, str]:
        group = groups.get(path.relative_to(root).as_posix())
        return (group, "") if group else ("", f"no group in {csv_path.name}")

    return group_of


def folder_grouper(source: FolderSource, index: int) -> GroupOf:
    """The group function of a folder source's group_by setting."""
    root = Path(source.path)
    where = f"sources.folders[{index}].group_by"
    if source.group_by == "folder":
        return _group_by_folder(root)
    if source.group_by.startswith("pattern:"):
        return _group_by_pattern(source.group_by.removeprefix("pattern:"), where)
    return _group_by_csv(source.group_by.removeprefix("csv:"), root)


GeneratorOf = Callable[[Path], str]  # file -> generator


def folder_generators(source: FolderSource) -> GeneratorOf:
    """The generator of each file: the group CSV's generator column where it names one, else source.generator."""
    root = Path(source.path)
    if not source.group_by.startswith("csv:"):
        return lambda path: source.generator
    table = read_group_table(_group_csv_path(source.group_by.removeprefix("csv:"), root))

    def generator_of(path: Path) -> str:
        _, generator = table.get(path.relative_to(root).as_posix(), ("", ""))
        return generator or source.generator

    return generator_of


@dataclass(frozen=True)
class FolderJob:
    source: FolderSource
    group_of: GroupOf
    generator_of: GeneratorOf | None = None  # default: source.generator for every file


def crawl_folder(state: CrawlState, job: FolderJob) -> None:
    """Copy a folder's images into incoming/ (the user's files are only read, and nothing outside the folder: see
    local_files); log every other file, symlinks included, with the reason it was left out."""
    source = job.source
    root = Path(source.path)
    name = f"folder:{root.name}"
    found = False
    entries = list(folder_entries(root, source.follow_symlinks))
    for entry in progress(entries, len(entries), f"crawl {name}", unit="file"):
        data, reason = _read_image(root, entry)
        if reason:
            _skip_file(state, name, source, entry.path, reason)
        else:
            found = True
            generator = job.generator_of(entry.path) if job.generator_of is not None else source.generator
            _import_file(state, name, source, entry.path, data, job.group_of, generator)
        state.checkpoint()
    if not found:
        state.note(name, "", f"no image files in {source.path}")


def left_out_reason(root: Path, entry: FolderEntry) -> str:
    """Why an import leaves an entry of root out ("" when it takes it): what the walk found, or the file's bytes."""
    return _read_image(root, entry, keep=False)[1]


def _read_image(root: Path, entry: FolderEntry, keep: bool = True) -> tuple[bytes, str]:
    """(the bytes of an entry the import takes (b"" unless keep), "") or (b"", why it is left out); the file is
    opened inside root (local_files.open_inside), so nothing outside it is read."""
    if entry.reason:
        return b"", entry.reason
    try:
        with open_inside(root, entry.target) as handle:
            reason = not_an_image(entry.path, handle)
            if reason or not keep:
                return b"", reason
            handle.seek(0)
            return handle.read(), ""
    except OSError as failure:
        return b"", f"unreadable: {failure.strerror or failure}"


def _skip_file(state: CrawlState, name: str, source: FolderSource, path: Path, reason: str) -> None:
    """Log a file the import leaves out (no sha256, the reason as its error) unless it is logged so already."""
    url = path.absolute().as_uri()
    if state.is_logged_failure(url, reason):
        return
    meta = {"source": name, "label": source.label, "group": "", "keyword": "", "generator": source.generator}
    state.record(meta, url, "", "", _size(path), reason)


def _size(path: Path) -> int:
    """The entry's own size (a symlink's, not its target's); 0 if it is gone."""
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _import_file(
    state: CrawlState,
    name: str,
    source: FolderSource,
    path: Path,
    data: bytes,
    group_of: GroupOf,
    generator: str | None = None,
) -> None:
    url = path.absolute().as_uri()
    group, error = group_of(path)
    generator = source.generator if generator is None else generator
    meta = {"source": name, "label": source.label, "group": group, "keyword": group, "generator": generator}
    if error:
        state.record(meta, url, "", "", len(data), error)
        state.count(name, group, "failed")
        return
    sha256 = bytes_sha256(data)
    if state.is_known_pair(url, sha256):
        state.count(name, group, "skipped")
        return
    sha256, ext, new = state.store(data, url)
    state.record(meta, url, sha256, ext, len(data), "")
    state.count(name, group, "new" if new else "skipped")
