"""Per-image caches: the key of every stage that reads one covers the code that makes it, and a fresh start of
the caches a config reads (--refresh-cache) removes those and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_lib.acquire import fingerprint, ingest
from pipeline_lib.core.code_index import CodeIndex, producer_parts
from pipeline_lib.core.config import PipelineConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review_pack
from pipeline_lib.learn import preprocess
from pipeline_lib.ops import caches

# cache -> (the functions that make its entries, the stage tasks that read it as "module:function")
READERS: dict[str, tuple[tuple[Callable[..., Any], ...], tuple[str, ...]]] = {
    "hashes": (
        fingerprint.HASH_PRODUCERS,
        ("per_image:plan_fingerprint", "per_image:hash_chunk", "per_image:merge_fingerprints")
        + ("per_image:merge_ingest",),
    ),
    "validation records": (
        ingest.VALIDATION_PRODUCERS,
        ("per_image:plan_ingest", "per_image:validate_chunk", "per_image:merge_ingest"),
    ),
    "tensors": (
        preprocess.TENSOR_PRODUCERS,
        (
            "per_image:plan_preprocess",
            "per_image:tensor_chunk",
            "per_image:merge_preprocess",
            "stages:train",
            "stages:evaluate",
            "stages:make_report",
            "stages:generalization",
        ),
    ),
    "face hints": (review_pack.FACE_PRODUCERS, ("stages:review_gate",)),
    "thumbnails": (review_pack.THUMBNAIL_PRODUCERS, ("stages:review_gate",)),
}


@pytest.mark.parametrize("cache", sorted(READERS))
def test_a_stage_that_reads_a_cache_is_keyed_by_the_code_that_makes_it(cache: str) -> None:
    """Else a change of that code would rename the cache but leave the stage Cached on the old entries."""
    index = CodeIndex()
    producers, readers = READERS[cache]
    made_by = producer_parts(*producers, index=index)
    for reader in readers:
        module, function = reader.split(":")
        stage = index.task_parts(f"tasks.{module}", function)
        missing = []
        for part, value in made_by.items():
            if part.startswith("code.producer."):  # a definition: the stage must reach its whole module
                part, value = f"code.{part.removeprefix('code.producer.').split(':')[0]}", None
            if part not in stage or value not in (None, stage[part]):
                missing.append(part)
        assert not missing, f"the key of {reader} lacks {missing}, which make the {cache} it reads"


def _fill(path: Path) -> None:
    """A cache file, or a folder holding one entry."""
    target = path if path.suffix else path / "ab" / "entry"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("entry", encoding="utf-8")


def test_a_fresh_start_removes_the_caches_the_config_reads_and_no_other(workspace: Workspace) -> None:
    config = PipelineConfig()
    current = caches.data_caches(workspace, config) + caches.model_caches(workspace, config)
    smaller = preprocess.tensor_folder(workspace, 16)
    for path in [*current, smaller]:
        _fill(path)
    assert caches.drop_caches(workspace, current) == current
    assert not [path for path in current if path.exists()], "a cache the config reads is left"
    assert smaller.is_dir(), "the tensors of another image size are not this config's"
    assert caches.drop_caches(workspace, current) == [], "nothing left to remove"
    with pytest.raises(ValueError, match="is not inside the workspace"):
        caches.drop_caches(workspace, [workspace.root.parent / "elsewhere"])
