"""Files the workspace lost: fetched again from their source (a folder, a web server) or reported as LOST."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.ingest import ingest, missing_notes
from pipeline_lib.acquire.recovery import missing_files, restore_missing
from pipeline_lib.core.config import FolderSource, IngestConfig, SourcesConfig
from pipeline_lib.core.workspace import file_sha256
from tests.conftest import make_image
from tests.loopback import REQUEST_TIMEOUT_S, LoopbackSite


def _imported(workspace, tmp_path: Path):
    folder = tmp_path / "ai"
    for index in range(3):
        make_image(folder / f"p{index}" / "v.png", seed=index, size=(64, 64), fmt="PNG")
    sources = SourcesConfig(folders=[FolderSource(path=folder, label="ai")])
    log = crawl_sources(workspace, sources).log
    catalog = ingest(workspace, log, IngestConfig())
    assert (catalog["status"] == "ok").all()
    return folder, sources, log, catalog


def test_a_store_file_deleted_by_hand_is_fetched_again_from_its_folder(workspace, tmp_path: Path, caplog):
    _, sources, log, catalog = _imported(workspace, tmp_path)
    victim = workspace.root / catalog["path"][0]
    sha = catalog["sha256"][0]
    victim.unlink()
    assert list(missing_files(workspace, log)) == [sha]
    recovered = restore_missing(workspace, log, sources)
    assert recovered.restored == {sha: catalog["path"][0]} and recovered.lost == []
    assert file_sha256(victim) == sha, "put back where the catalog says it is, with the same bytes"
    assert "fetched again" in caplog.text
    again = ingest(workspace, log, IngestConfig())
    assert (again["status"] == "ok").all() and missing_notes(again) == []


def test_a_file_whose_source_is_gone_too_is_reported_loudly(workspace, tmp_path: Path, caplog):
    folder, sources, log, catalog = _imported(workspace, tmp_path)
    (workspace.root / catalog["path"][1]).unlink()
    (folder / "p1" / "v.png").write_bytes(b"other bytes now")
    (workspace.root / catalog["path"][2]).unlink()
    (folder / "p2" / "v.png").unlink()
    recovered = restore_missing(workspace, log, sources)
    assert recovered.restored == {} and len(recovered.lost) == 2
    reasons = {item.sha256: item.reason for item in recovered.lost}
    assert "now holds other bytes" in reasons[catalog["sha256"][1]]
    assert "is gone too" in reasons[catalog["sha256"][2]]
    assert "LOST:" in caplog.text and any(note.startswith("LOST:") for note in recovered.notes())
    after = ingest(workspace, log, IngestConfig())
    assert (after["status"] == "invalid:missing_file").sum() == 2
    (note,) = missing_notes(after)
    assert "2 file(s) of the crawl log are gone" in note and catalog["sha256"][2][:12] in note


def test_a_downloaded_file_is_fetched_again_from_its_url(workspace, tmp_path: Path):
    image = make_image(tmp_path / "a.jpg", seed=4).read_bytes()
    site = LoopbackSite({"a.jpg": image})
    with site.serve() as endpoint:
        search = {"engine": "bing", "endpoint": endpoint, "keywords": ["k"], "max_num": 5, "threads": 1}
        sources = SourcesConfig(allow_private_addresses=True, request_timeout_s=REQUEST_TIMEOUT_S, search=[search])
        log = crawl_sources(workspace, sources).log
        catalog = ingest(workspace, log, IngestConfig())
        (workspace.root / catalog["path"][0]).unlink()
        recovered = restore_missing(workspace, log, sources)
    assert list(recovered.restored) == [catalog["sha256"][0]] and site.hits["a.jpg"] == 2


def test_a_truncated_store_file_is_rewritten_from_its_source(workspace, tmp_path: Path):
    _, sources, log, catalog = _imported(workspace, tmp_path)
    victim = workspace.root / catalog["path"][0]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:100])  # a crash or a full disk
    assert list(missing_files(workspace, log)) == [catalog["sha256"][0]]
    assert list(restore_missing(workspace, log, sources).restored) == [catalog["sha256"][0]]
    assert victim.read_bytes() == whole


def test_a_truncated_store_file_without_a_source_is_set_aside_and_reported(workspace, tmp_path: Path):
    folder, sources, log, catalog = _imported(workspace, tmp_path)
    victim = workspace.root / catalog["path"][0]
    victim.write_bytes(victim.read_bytes()[:100])
    (folder / catalog["group"][0] / "v.png").unlink()
    recovered = restore_missing(workspace, log, sources)
    assert [item.sha256 for item in recovered.lost] == [catalog["sha256"][0]]
    assert not victim.exists() and (workspace.root / "damaged" / catalog["path"][0]).is_file()
    assert ingest(workspace, log, IngestConfig())["status"][0] == "invalid:missing_file"
