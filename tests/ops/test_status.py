"""What a workspace holds, as `aidetect status` shows it: folder accounts judged against the newest ingest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.imports import IMPORTED, QUARANTINED, add_import, with_imports
from pipeline_lib.acquire.ingest import ingest
from pipeline_lib.core.catalog import write_snapshot
from pipeline_lib.core.config import FolderSource, IngestConfig, SourcesConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.ops.status import folder_accounts
from tests.conftest import make_image


def _crawl_and_ingest(workspace: Workspace) -> pd.DataFrame:
    result = crawl_sources(workspace, with_imports(SourcesConfig(), workspace))
    catalog = ingest(workspace, result.log, IngestConfig(min_side=8))
    write_snapshot(workspace, "ingest", catalog)
    return catalog


def test_files_ingested_after_the_last_run_are_accounted_for(workspace: Workspace, tmp_path: Path) -> None:
    folder = tmp_path / "dataQ"
    make_image(folder / "a.png", seed=1, fmt="PNG")
    add_import(workspace, FolderSource(path=folder, label="ai"))
    ingested = _crawl_and_ingest(workspace)  # a full run: ingest, then the later stages' snapshots
    write_snapshot(workspace, "split", ingested.assign(split="train"))
    make_image(folder / "b.png", seed=2, fmt="PNG")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _crawl_and_ingest(workspace)  # an import after the run: only its ingest snapshot is newer than the split
    (account,) = folder_accounts(workspace)
    outcomes = {item.name: item.outcome for item in account.files}
    assert outcomes == {"a.png": IMPORTED, "b.png": IMPORTED, "c.png": QUARANTINED}, outcomes
