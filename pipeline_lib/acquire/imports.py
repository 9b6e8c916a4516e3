"""Folders imported into a workspace with `aidetect import`: kept as extra folder sources of every later run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from pipeline_lib.acquire.local_files import folder_entries
from pipeline_lib.core.catalog import INVALID_PREFIX
from pipeline_lib.core.config import ConfigError, FolderSource, SourcesConfig
from pipeline_lib.core.workspace import Workspace, atomic_write_text

log = logging.getLogger(__name__)

IMPORTED, QUARANTINED, LEFT_OUT, NOT_SEEN = "imported", "quarantined", "left out", "not seen yet"


def imports_path(workspace: Workspace) -> Path:
    """Where the workspace lists its imported folders."""
    return workspace.crawl / "imports.json"


def read_imports(workspace: Workspace) -> list[FolderSource]:
    """The imported folder sources, oldest first; ConfigError naming the file and entry if one is invalid."""
    path = imports_path(workspace)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    sources = []
    for index, entry in enumerate(entries):
        try:
            sources.append(FolderSource(**entry))
        except (ValidationError, TypeError) as error:
            raise ConfigError(f"{path} entry {index} is not a valid folder source: {error}") from None
    return sources


def add_import(workspace: Workspace, source: FolderSource) -> list[FolderSource]:
    """Record a folder source (replacing an earlier import of the same folder); return all imports."""
    if not source.path.is_absolute():
        raise ConfigError(f"import path must be absolute, got {source.path}")
    if not source.path.is_dir():
        raise ConfigError(f"import folder {source.path} does not exist or is not a directory")
    kept = [earlier for earlier in read_imports(workspace) if earlier.path != source.path]
    updated = [*kept, source]
    atomic_write_text(imports_path(workspace), json.dumps([s.model_dump(mode="json") for s in updated], indent=2))
    log.info("workspace %s now imports %d folder(s)", workspace.root, len(updated))
    return updated


def with_imports(sources: SourcesConfig, workspace: Workspace) -> SourcesConfig:
    """The configured sources plus the workspace's imported folders (a folder configured already is not added)."""
    configured = {folder.path for folder in sources.folders}
    extra = [source for source in read_imports(workspace) if source.path not in configured]
    return sources.model_copy(update={"folders": [*sources.folders, *extra]}) if extra else sources


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file of an imported folder: imported, quarantined, left out or not seen yet."""

    name: str  # path relative to the folder
    outcome: str
    reason: str = ""


@dataclass(frozen=True)
class FolderAccount:
    """Every non-hidden file of a folder source with its outcome, so that files in = files accounted for."""

    folder: Path
    label: str
    files: list[FileOutcome]

    def count(self, outcome: str) -> int:
        """How many files have this outcome."""
        return sum(item.outcome == outcome for item in self.files)

    def with_reasons(self, outcome: str) -> list[FileOutcome]:
        """The files with this outcome (each has its reason)."""
        return [item for item in self.files if item.outcome == outcome]


def account_folder(source: FolderSource, crawl_log: pd.DataFrame, catalog: pd.DataFrame | None) -> FolderAccount:
    """Outcome of each non-hidden file of source's folder from the crawl log (url -> sha256 or error) and a catalog.

    imported: in the catalog and not invalid; quarantined: in the catalog as invalid:<reason>; left out: the crawl
    logged an error for it (not an image, no group, unreadable); not seen: no crawl or ingest has looked at it yet.
    """
    last = crawl_log.drop_duplicates("url", keep="last").set_index("url") if len(crawl_log) else None
    status = _status_by_sha(catalog)
    root = Path(source.path)
    outcomes = []
    for entry in folder_entries(root, source.follow_symlinks):
        name = entry.path.relative_to(root).as_posix()
        url = entry.path.absolute().as_uri()
        row = last.loc[url] if last is not None and url in last.index else None
        outcomes.append(_outcome(name, row, status))
    return FolderAccount(root, source.label, outcomes)


def _status_by_sha(catalog: pd.DataFrame | None) -> dict[str, str]:
    if catalog is None or catalog.empty:
        return {}
    return dict(zip(catalog["sha256"].astype(str), catalog["status"].astype(str), strict=True))


def _outcome(name: str, row: pd.Series | None, status: dict[str, str]) -> FileOutcome:
    if row is None:
        return FileOutcome(name, NOT_SEEN, "not crawled yet")
    if str(row["error"]) or not str(row["sha256"]):
        return FileOutcome(name, LEFT_OUT, str(row["error"]) or "no content")
    found = status.get(str(row["sha256"]))
    if found is None:
        return FileOutcome(name, NOT_SEEN, "not ingested yet")
    if found.startswith(INVALID_PREFIX):
        return FileOutcome(name, QUARANTINED, found.removeprefix(INVALID_PREFIX))
    return FileOutcome(name, IMPORTED)
