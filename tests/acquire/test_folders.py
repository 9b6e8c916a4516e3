"""Folder imports: the three grouping rules (sub-folder, pattern:, csv: with a generator column), files that are not
images logged once with their reason, the user's files only read, changed files fetched again."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_lib.acquire import folders
from pipeline_lib.acquire.crawl import CrawlResult, crawl_sources
from pipeline_lib.acquire.imports import NOT_SEEN, account_folder
from pipeline_lib.acquire.ingest import ingest
from pipeline_lib.core.config import FolderSource, IngestConfig
from pipeline_lib.core.workspace import Workspace, bytes_sha256, default_file_mode
from tests.acquire.crawl_helpers import NOW, incoming, jpeg, loopback_sources
from tests.conftest import files_holding, make_image


def _folder(root: Path) -> Path:
    make_image(root / "alice" / "alice_1.jpg", seed=1)
    make_image(root / "alice" / "deeper" / "alice_2.png", seed=2, fmt="PNG")
    make_image(root / "bob_7.jpg", seed=3)
    make_image(root / "noname.jpg", seed=4)
    make_image(root / ".hidden.jpg", seed=5)
    make_image(root / ".cache" / "x_1.jpg", seed=6)
    (root / ".gitkeep").write_text("", encoding="utf-8")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    make_image(root / "no_extension", seed=7)  # a JPEG whose name says nothing
    return root


def _groups(result: CrawlResult) -> dict[str, tuple[str, str]]:
    return {Path(url).name: (group, error) for url, group, error in result.log[["url", "group", "error"]].values}


def test_folder_grouped_by_sub_folder(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    source = FolderSource(path=root, label="ai", group_by="folder", generator="midjourney")
    result = crawl_sources(workspace, loopback_sources(folders=[source]), now=NOW)
    assert _groups(result) == {
        "alice_1.jpg": ("alice", ""),
        "alice_2.png": ("alice", ""),
        "bob_7.jpg": ("bob_7", ""),
        "noname.jpg": ("noname", ""),
        "no_extension": ("no_extension", ""),
        "notes.txt": ("", "not an image (text)"),
    }
    assert set(result.log["source"]) == {"folder:imgs"} and set(result.log["generator"]) == {"midjourney"}
    assert result.log["url"].str.startswith("file://").all()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # copied, never moved
    for row in result.log[result.log["sha256"] != ""].itertuples():
        assert (
            incoming(workspace, row.sha256, row.ext).read_bytes() == Path(root / row.url.split("imgs/")[1]).read_bytes()
        )
    again = crawl_sources(workspace, loopback_sources(folders=[source]))
    assert len(again.log) == len(result.log) and again.summary["skipped"].sum() == 5  # notes.txt is logged once
    (root / "bob_7.jpg").write_bytes(jpeg(tmp_path, 9))  # changed content under the same URL
    third = crawl_sources(workspace, loopback_sources(folders=[source]))
    assert len(third.log) == len(result.log) + 1 and third.summary["new"].sum() == 1


def test_folder_grouped_by_pattern(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    source = FolderSource(path=root, label="ai", group_by=r"pattern:^([a-z]+)_\d+")
    result = crawl_sources(workspace, loopback_sources(folders=[source]))
    groups = _groups(result)
    assert groups["alice_1.jpg"] == ("alice", "") and groups["bob_7.jpg"] == ("bob", "")
    assert groups["noname.jpg"] == groups["no_extension"] == ("", "group pattern did not match")
    assert result.summary["failed"].sum() == 2
    whole_match = FolderSource(path=root, label="ai", group_by="pattern:[a-z]+")
    whole = crawl_sources(workspace, loopback_sources(folders=[whole_match]))
    assert _groups(whole)["noname.jpg"] == ("noname", "")


def test_folder_grouped_by_csv(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "groups.csv").write_text(
        "file,group\nalice/alice_1.jpg,p1\nalice/deeper/alice_2.png,p1\nbob_7.jpg,p2\n", encoding="utf-8"
    )
    result = crawl_sources(
        workspace, loopback_sources(folders=[FolderSource(path=root, label="ai", group_by="csv:groups.csv")])
    )
    groups = _groups(result)
    assert groups["alice_2.png"] == ("p1", "") and groups["bob_7.jpg"] == ("p2", "")
    assert groups["noname.jpg"] == ("", "no group in groups.csv")
    other = FolderSource(path=root, label="ai", group_by="csv:other.csv")
    with pytest.raises(FileNotFoundError, match="other.csv"):
        crawl_sources(workspace, loopback_sources(folders=[other]))


def test_group_csv_generator_column_names_each_files_generator(workspace: Workspace, tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "groups.csv").write_text(
        "file,group,generator\n"
        "alice/alice_1.jpg,p1,midjourney\n"
        "alice/deeper/alice_2.png,p1,stable-diffusion\n"
        "bob_7.jpg,p2,\n"
        "noname.jpg,p3, DALL·E 3 \n",
        encoding="utf-8",
    )
    source = FolderSource(path=root, label="ai", group_by="csv:groups.csv", generator="unknown-tool")
    result = crawl_sources(workspace, loopback_sources(folders=[source]))
    generators = dict(zip(result.log["url"].map(lambda u: Path(u).name), result.log["generator"], strict=True))
    assert generators == {
        "alice_1.jpg": "midjourney",
        "alice_2.png": "stable-diffusion",
        "bob_7.jpg": "unknown-tool",  # empty cell: the folder's generator
        "noname.jpg": "DALL·E 3",
        "no_extension": "unknown-tool",  # an image by its bytes, not in the CSV
        "groups.csv": "unknown-tool",  # left out (not images): logged with the folder's generator
        "notes.txt": "unknown-tool",
    }
    assert folders.read_group_csv(root / "groups.csv", root)["bob_7.jpg"] == "p2"


def test_an_import_reads_nothing_outside_its_folder(workspace: Workspace, tmp_path: Path, outside_secret: Path) -> None:
    root = tmp_path / "imgs"
    make_image(root / "alice" / "1.png", seed=1, fmt="PNG")
    (root / "alice" / "2.png").symlink_to("1.png")  # inside the folder
    (root / "shadow.png").symlink_to(outside_secret)  # the file outside tmp_path a hostile folder points to
    (root / "etc").symlink_to(outside_secret.parent, target_is_directory=True)
    secret = outside_secret.read_bytes()
    logged = {}
    for follow in (False, True):
        source = FolderSource(path=root, label="ai", follow_symlinks=follow)
        result = crawl_sources(workspace, loopback_sources(folders=[source]))
        catalog = ingest(workspace, result.log, IngestConfig(min_side=8))
        names = result.log["url"].map(lambda url: url.split("/imgs/")[1])
        logged[follow] = dict(zip(names, result.log["error"], strict=True))  # the last row of each file
        assert bytes_sha256(secret) not in set(result.log["sha256"]), "the secret's content reached the crawl log"
        assert files_holding(workspace.root, secret) == [], "the secret's bytes reached the workspace"
        assert account_folder(source, result.log, catalog).count(NOT_SEEN) == 0, "every entry is accounted for"
    assert logged[False] == {"alice/1.png": "", "alice/2.png": "symlink", "etc": "symlink", "shadow.png": "symlink"}
    assert logged[True]["alice/2.png"] == "", "a symlink inside the folder is followed when asked"
    assert logged[True]["shadow.png"] == logged[True]["etc"] == "symlink outside the folder", logged[True]
    # whatever was written (incoming/, store/, quarantine/) has no wider permissions than the user's umask allows
    for path in [*workspace.incoming.rglob("*"), *workspace.store.rglob("*"), *workspace.quarantine.rglob("*")]:
        if path.is_file():
            assert path.stat().st_mode & 0o777 & ~default_file_mode() == 0, f"{path}: {oct(path.stat().st_mode)}"
