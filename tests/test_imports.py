"""Imported folders persist in the workspace and join the configured sources."""

from __future__ import annotations

import pytest

from pipeline_lib.config import ConfigError, FolderSource, SourcesConfig
from pipeline_lib.imports import add_import, imports_path, read_imports, with_imports


def test_import_is_recorded_once_per_folder_and_joins_sources(workspace, tmp_path):
    folder = tmp_path / "midjourney"
    folder.mkdir()
    add_import(workspace, FolderSource(path=folder, label="ai", group_by="folder"))
    add_import(workspace, FolderSource(path=folder, label="ai", group_by="pattern:^(\\w+)_", generator="mj"))
    imports = read_imports(workspace)
    assert len(imports) == 1 and imports[0].generator == "mj"
    merged = with_imports(SourcesConfig(), workspace)
    assert [s.path for s in merged.folders] == [folder]
    configured = SourcesConfig(folders=[FolderSource(path=folder, label="ai")])
    assert with_imports(configured, workspace).folders == configured.folders


def test_missing_folder_and_damaged_file_are_named(workspace, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        add_import(workspace, FolderSource(path=tmp_path / "nope", label="ai"))
    imports_path(workspace).parent.mkdir(parents=True, exist_ok=True)
    imports_path(workspace).write_text('[{"path": "/x", "label": "fake"}]', encoding="utf-8")
    with pytest.raises(ConfigError, match="entry 0"):
        read_imports(workspace)
