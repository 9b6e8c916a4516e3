"""Folders imported into a workspace with `aidetect import`: kept as extra folder sources of every later run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError

from pipeline_lib.config import ConfigError, FolderSource, SourcesConfig
from pipeline_lib.workspace import Workspace, atomic_write_text

log = logging.getLogger(__name__)


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
