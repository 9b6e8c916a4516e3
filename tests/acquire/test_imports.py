"""Imported folders persist in the workspace and join the configured sources."""

from __future__ import annotations

import pytest

from pipeline_lib.acquire.imports import add_import, imports_path, read_imports, with_imports
from pipeline_lib.core.config import ConfigError, FolderSource, SourcesConfig


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


def test_every_file_of_an_imported_folder_is_accounted_for(workspace, tmp_path):
    import pandas as pd

    from pipeline_lib.acquire.imports import account_folder
    from tests.conftest import make_image

    folder = tmp_path / "imgs"
    make_image(folder / "a" / "1.jpg", seed=1)
    make_image(folder / "a" / "2.png", seed=2, fmt="PNG")
    (folder / "b.txt").write_text("x", encoding="utf-8")
    make_image(folder / "new.jpg", seed=3)  # arrived after the crawl
    make_image(folder / ".hidden.jpg", seed=4)
    url = {name: (folder / name).absolute().as_uri() for name in ("a/1.jpg", "a/2.png", "b.txt")}
    crawl_log = pd.DataFrame(
        {
            "url": [url["a/1.jpg"], url["a/2.png"], url["b.txt"]],
            "sha256": ["s1", "s2", ""],
            "error": ["", "", "not an image (text)"],
        }
    )
    catalog = pd.DataFrame({"sha256": ["s1", "s2"], "status": ["ok", "invalid:truncated"]})
    account = account_folder(FolderSource(path=folder, label="ai"), crawl_log, catalog)
    outcomes = {item.name: (item.outcome, item.reason) for item in account.files}
    assert outcomes == {
        "a/1.jpg": ("imported", ""),
        "a/2.png": ("quarantined", "truncated"),
        "b.txt": ("left out", "not an image (text)"),
        "new.jpg": ("not seen yet", "not crawled yet"),
    }
    assert account.count("imported") == 1 and len(account.files) == 4
