"""Helpers shared by the crawl tests (test_crawl*.py, test_fetch.py, test_engines.py, test_downloader.py,
test_sources.py, test_folders.py): loopback sources, tiny images, and checks on the files a crawl writes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline_lib.core.config import SourcesConfig
from pipeline_lib.core.workspace import Workspace, file_sha256
from pipeline_lib.ops.demo_data import DemoDataset
from tests.conftest import make_image
from tests.loopback import REQUEST_TIMEOUT_S

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def loopback_sources(**kwargs: Any) -> SourcesConfig:
    """Loopback sources; recrawl_after_hours 0 (every crawl searches every keyword) unless a test says otherwise."""
    base = {
        "allow_private_addresses": True,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "max_retries": 1,
        "recrawl_after_hours": 0,
    }
    return SourcesConfig.model_validate(base | kwargs)


def bing(endpoint: str, keywords: list[str], **kwargs: Any) -> dict[str, Any]:
    """A Bing search source on endpoint."""
    return {"engine": "bing", "endpoint": endpoint, "keywords": keywords, "max_num": 10, "threads": 2} | kwargs


def served_urls(dataset: DemoDataset, endpoint: str, keywords: list[str]) -> set[str]:
    """The image URLs the demo search site lists for keywords."""
    base = endpoint.split("/images/")[0]
    return {f"{base}/img/{k}/{p.name}" for k in keywords for p in (dataset.site_dir / k).iterdir()}


def incoming(workspace: Workspace, sha: str, ext: str) -> Path:
    """Where a crawl puts the bytes with this sha256."""
    return workspace.incoming / sha[:2] / f"{sha}.{ext}"


def jpeg(tmp_path: Path, seed: int) -> bytes:
    """The bytes of a small JPEG."""
    return make_image(tmp_path / f"src-{seed}.jpg", seed=seed).read_bytes()


def jpegs(tmp_path: Path, n: int) -> dict[str, bytes]:
    """n small JPEGs named 0.jpg .. {n-1}.jpg."""
    return {f"{i}.jpg": jpeg(tmp_path, i) for i in range(n)}


def no_half_written_files(workspace: Workspace) -> None:
    """Every file in incoming/, store/ and quarantine/ is whole: no temporary names, bytes matching the name."""
    for folder in (workspace.incoming, workspace.store, workspace.quarantine):
        for path in folder.rglob("*"):
            assert not path.name.startswith(".") and not path.name.endswith(".part"), f"temporary file {path}"
            if path.is_file():
                assert file_sha256(path) == path.stem, f"{path} does not hold the bytes its name says"
                assert path.parent.name == path.stem[:2] or folder == workspace.quarantine
