"""Stage cache keys: inputs by content, the files a config names, how parts are shown and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_lib.core import cachekey
from pipeline_lib.core.cachekey import StageKey
from pipeline_lib.core.code_index import CacheKeyError
from pipeline_lib.core.config import (
    DedupConfig,
    FolderSource,
    SearchSource,
    SourcesConfig,
    TrainConfig,
    UrlListSource,
)
from pipeline_lib.core.workspace import Ref


def test_named_files_are_keyed_by_content(tmp_path: Path) -> None:
    keywords, urls, folder = tmp_path / "names.txt", tmp_path / "urls.csv", tmp_path / "ai"
    keywords.write_text("alice\n", encoding="utf-8")
    urls.write_text("url,label,group\n", encoding="utf-8")
    (folder / "p1").mkdir(parents=True)
    (folder / "groups.csv").write_text("file,group\n", encoding="utf-8")
    sources = SourcesConfig(
        search=[SearchSource(keywords_file=keywords)],
        urls=[UrlListSource(csv=urls)],
        folders=[FolderSource(path=folder, label="ai", group_by="csv:groups.csv")],
    )
    before = cachekey.input_parts({"sources": sources, "root": "/ignored"})
    assert set(before) == {
        "input.sources",
        "file.search.0.keywords_file",
        "file.urls.0.csv",
        "file.folders.0.listing",
        "file.folders.0.group_csv",
    }
    keywords.write_text("alice\nbob\n", encoding="utf-8")
    urls.write_text("url,label,group\nhttp://x/1.jpg,real,a\n", encoding="utf-8")
    (folder / "p1" / "new.png").write_bytes(b"png")
    (folder / "groups.csv").write_text("file,group\np1/new.png,p1\n", encoding="utf-8")
    after = cachekey.input_parts({"sources": sources})
    assert cachekey.changed_parts(after, before) == ", ".join(sorted(set(before) - {"input.sources"}))


def test_a_state_dict_given_as_weights_is_keyed_by_content(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    before = cachekey.input_parts({"config": TrainConfig(weights=str(weights))})
    weights.write_bytes(b"2")
    assert cachekey.changed_parts(cachekey.input_parts({"config": TrainConfig(weights=str(weights))}), before) == (
        "file.train.weights"
    )
    assert "file.train.weights" not in cachekey.input_parts({"config": TrainConfig(weights="imagenet")})


def test_inputs_are_keyed_by_content_not_by_path_and_unkeyed_ones_are_left_out() -> None:
    one = cachekey.input_parts({"root": "/a", "catalog": Ref("catalog/x.parquet", "d1"), "config": DedupConfig()})
    moved = cachekey.input_parts({"root": "/b", "catalog": Ref("elsewhere.parquet", "d1"), "config": DedupConfig()})
    assert one == moved == {"input.catalog": "d1", "input.config": DedupConfig().model_dump_json()}
    assert cachekey.input_parts({"chunk_size": 1, "resume": False}) == {}
    with pytest.raises(CacheKeyError, match="object has no content digest"):
        cachekey.input_parts({"thing": object()})


def test_long_values_are_shown_by_digest_and_changes_are_named() -> None:
    key = StageKey({"input.config": "x" * 600, "code.task": "abc"})
    shown = cachekey.shown_parts(key)
    assert shown["code.task"] == "abc" and shown["input.config"].startswith("sha256:") and "600 chars" in shown[
        "input.config"
    ]
    assert cachekey.changed_parts(shown, None) == "(no earlier run of this stage)"
    assert cachekey.changed_parts(shown, shown) == "(none: the key is unchanged)"
    assert cachekey.changed_parts({"a": "1"}, {"b": "1"}) == "a, b"
