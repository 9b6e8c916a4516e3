"""One crawl's bookkeeping: bytes stored once per sha256 whatever the threads do, files the workspace holds already
not copied again, extensions from the bytes."""

from __future__ import annotations

import io
import random
import threading
from collections import Counter
from pathlib import Path

from pipeline_lib.acquire import crawl_state
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.crawl_log import empty_log
from pipeline_lib.acquire.crawl_state import detect_ext
from pipeline_lib.core.config import FolderSource
from pipeline_lib.core.workspace import Workspace, bytes_sha256
from pipeline_lib.ops.demo_data import DemoDataset, search_site
from tests.acquire.crawl_helpers import NOW, bing, incoming, jpeg, loopback_sources
from tests.conftest import make_image


def test_exact_duplicate_under_a_second_url_is_logged_and_skipped(workspace: Workspace, dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        result = crawl_sources(workspace, loopback_sources(search=[bing(endpoint, ["person-01"])]))
    row = result.summary.iloc[0]
    assert (row["new"], row["skipped"], row["failed"]) == (len(result.log) - 1, 1, 0)
    assert result.log["sha256"].duplicated().sum() == 1
    assert len(list(workspace.incoming.rglob("*.*"))) == len(result.log) - 1


def test_concurrent_stores_of_the_same_bytes_write_each_file_once(workspace: Workspace) -> None:
    payloads = [bytes([i]) * (50_000 + i) for i in range(16)]
    state = crawl_state.CrawlState(workspace, empty_log(), NOW)
    start = threading.Barrier(48)
    outcomes: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def store_all(seed: int) -> None:
        order = random.Random(seed).sample(payloads, len(payloads))
        start.wait()
        for data in order:
            outcome = state.store(data, "http://h/x.jpg")
            with lock:
                outcomes.append(outcome)

    workers = [threading.Thread(target=store_all, args=(seed,)) for seed in range(48)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    new = Counter(sha for sha, _, is_new in outcomes if is_new)
    assert sorted(new) == sorted(bytes_sha256(data) for data in payloads) and set(new.values()) == {1}
    assert len(outcomes) == 48 * 16 and {ext for _, ext, _ in outcomes} == {"jpg"}
    files = sorted(path for path in workspace.incoming.rglob("*") if path.is_file())
    assert [path.read_bytes() for path in files] == sorted(payloads, key=bytes_sha256)
    state.sync()  # durable before the log names them; a second crawl state finds them all held
    held = crawl_state.held_files(workspace)
    assert all(held[bytes_sha256(data)].read_bytes() == data for data in payloads)


def test_file_already_in_the_store_is_logged_but_not_copied(workspace: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    data = make_image(root / "p" / "a.jpg", seed=3).read_bytes()
    result = crawl_sources(workspace, loopback_sources(folders=[FolderSource(path=root, label="real")]))
    sha = result.log["sha256"].iloc[0]
    stored = workspace.store_path(sha, "jpg")
    stored.parent.mkdir(parents=True)
    incoming(workspace, sha, "jpg").rename(stored)
    (root / "p" / "b.jpg").write_bytes(data)
    second = crawl_sources(workspace, loopback_sources(folders=[FolderSource(path=root, label="real")]))
    assert second.summary[["new", "skipped"]].sum().tolist() == [0, 2]
    assert len(second.log) == 2 and not list(workspace.incoming.rglob("*.jpg"))


def test_detect_ext_prefers_the_bytes(tmp_path: Path) -> None:
    png = io.BytesIO()
    make_image(tmp_path / "a.png", fmt="PNG")
    png.write((tmp_path / "a.png").read_bytes())
    assert detect_ext(png.getvalue(), "http://h/photo.jpg") == "png"
    assert detect_ext(jpeg(tmp_path, 1), "http://h/no-suffix") == "jpg"
    assert detect_ext(b"<html></html>", "http://h/x.JPEG?size=2") == "jpg"
    assert detect_ext(b"<html></html>", "http://h/page") == "bin"
