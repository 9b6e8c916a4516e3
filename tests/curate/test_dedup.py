"""Duplicate detection: the BK-tree index against brute force, exact and near duplicates, keepers, clusters."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline_lib.acquire.fingerprint import fingerprint_catalog
from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.curate import dedup
from pipeline_lib.curate.dedup import (
    BKTree,
    MultiIndexHash,
    brute_force_pairs,
    find_duplicates,
    find_near_pairs,
    hamming,
    parse_hashes,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def planted_hashes(n: int, bits: int, seed: int) -> list[int]:
    """Random hashes where about a third are copies of an earlier one with a few bits flipped."""
    rng = random.Random(seed)
    hashes: list[int] = []
    for _ in range(n):
        if hashes and rng.random() < 0.35:
            value = rng.choice(hashes)
            for bit in rng.sample(range(bits), rng.randint(0, 8)):
                value ^= 1 << bit
        else:
            value = rng.getrandbits(bits)
        hashes.append(value)
    return hashes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
def test_bk_tree_pairs_equal_brute_force(seed: int, threshold: int) -> None:
    hashes = planted_hashes(400, 64, seed)
    found = find_near_pairs(hashes, threshold)
    assert found == brute_force_pairs(hashes, threshold)
    if threshold >= 6:
        assert len(found) > 50  # the planted pairs are there


@settings(max_examples=60, deadline=None)
@given(
    hashes=st.lists(st.integers(min_value=0, max_value=(1 << 16) - 1), max_size=60),
    probe=st.integers(min_value=0, max_value=(1 << 16) - 1),
    radius=st.integers(min_value=0, max_value=16),
)
def test_bk_tree_query_is_exact(hashes: list[int], probe: int, radius: int) -> None:
    tree = BKTree(hashes)
    assert len(tree) == len(hashes)
    assert tree.query(probe, radius) == [i for i, h in enumerate(hashes) if hamming(h, probe) <= radius]


@settings(max_examples=60, deadline=None)
@given(
    hashes=st.lists(st.integers(min_value=0, max_value=(1 << 16) - 1), max_size=60),
    probe=st.integers(min_value=0, max_value=(1 << 16) - 1),
    radius=st.integers(min_value=0, max_value=16),
    chunks=st.integers(min_value=1, max_value=16),
)
def test_multi_index_query_is_exact(hashes: list[int], probe: int, radius: int, chunks: int) -> None:
    index = MultiIndexHash(16, radius, chunks)
    for value in hashes:
        index.add(value)
    assert index.query(probe) == [i for i, h in enumerate(hashes) if hamming(h, probe) <= radius]


@pytest.mark.parametrize("threshold", [0, 2, 6, 20])
def test_bk_tree_and_multi_index_agree_with_brute_force_on_256_bit_hashes(threshold: int) -> None:
    hashes = planted_hashes(300, 256, seed=threshold)
    expected = brute_force_pairs(hashes, threshold)
    assert find_near_pairs(hashes, threshold) == expected
    tree = BKTree(hashes)
    assert sorted((i, j) for j, h in enumerate(hashes) for i in tree.query(h, threshold) if i < j) == expected


def test_bk_tree_rejects_negative_radius() -> None:
    with pytest.raises(ValueError, match="radius must be >= 0"):
        BKTree([1, 2]).query(1, -1)
    assert BKTree().query(5, 3) == []


def test_parse_hashes_names_bad_input() -> None:
    assert parse_hashes(["0f", "ff"]) == [15, 255]
    with pytest.raises(ValueError, match="different lengths"):
        parse_hashes(["0f", "0fff"])
    with pytest.raises(ValueError, match="no phash"):
        parse_hashes(["0f", ""])
    with pytest.raises(ValueError, match="hexadecimal"):
        parse_hashes(["0g"])


def row(sha: str, phash: str, **fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "sha256": sha,
        "path": f"store/{sha[:2]}/{sha}.jpg",
        "label": "real",
        "group": "g1",
        "status": "ok",
        "phash": phash,
        "width": 100,
        "height": 100,
        "fetched_at": T0,
    }
    record.update(fields)
    return record


def sha(char: str) -> str:
    return char * 64


def test_exact_duplicates_keep_the_earliest_row() -> None:
    catalog = new_rows(
        [
            row(sha("a"), "00ff00ff00ff00ff", fetched_at=T0 + timedelta(hours=2), url="late"),
            row(sha("a"), "00ff00ff00ff00ff", fetched_at=T0, url="early"),
            row(sha("a"), "00ff00ff00ff00ff", fetched_at=T0 + timedelta(hours=1), url="middle"),
            row(sha("b"), "ffffffff00000000"),
        ]
    )
    result = find_duplicates(catalog, threshold=6)
    status = dict(zip(result.catalog["url"], result.catalog["status"], strict=True))
    assert status == {"late": f"duplicate_of:{sha('a')}", "early": "ok", "middle": f"duplicate_of:{sha('a')}", "": "ok"}
    assert (result.n_exact, result.n_near, result.n_clusters) == (2, 0, 0)
    assert (result.catalog["cluster"] == "").all()


def test_keeper_is_the_largest_image_then_earliest_then_smallest_sha() -> None:
    catalog = new_rows(
        [
            row(sha("a"), "0000000000000000", width=100, height=100, fetched_at=T0),
            row(sha("b"), "0000000000000003", width=200, height=150, fetched_at=T0 + timedelta(days=1)),
            row(sha("c"), "000000000000000f", width=200, height=150, fetched_at=T0 + timedelta(days=2)),
            row(sha("b"), "0000000000000003", width=200, height=150, fetched_at=T0 + timedelta(days=3)),
            row(sha("e"), "0000000000000001", width=50, height=50, fetched_at=T0, status="invalid:too_small"),
        ]
    )
    result = find_duplicates(catalog, threshold=6)
    out = result.catalog
    assert list(out["status"]) == [
        f"duplicate_of:{sha('b')}",
        "ok",
        f"duplicate_of:{sha('b')}",
        f"duplicate_of:{sha('b')}",
        "invalid:too_small",
    ]
    assert list(out["cluster"]) == [sha("b")] * 4 + [""]
    assert (result.n_exact, result.n_near, result.n_clusters) == (1, 2, 1)  # the 2nd b row is an exact copy
    tie = new_rows([row(sha("d"), "00", fetched_at=T0), row(sha("c"), "01", fetched_at=T0)])
    assert list(find_duplicates(tie, 1).catalog["status"]) == [f"duplicate_of:{sha('c')}", "ok"]


def test_non_ok_rows_are_untouched() -> None:
    catalog = new_rows(
        [
            row(sha("a"), "0000", cluster="stale"),
            row(sha("b"), "0001", status="rejected", cluster="old", group="x"),
            row(sha("c"), "", status="invalid:truncated"),
            row(sha("d"), "0003", status="pending_review"),
            row(sha("a"), "0000", status=f"duplicate_of:{sha('z')}"),
        ]
    )
    result = find_duplicates(catalog, threshold=4)
    pd.testing.assert_frame_equal(result.catalog.iloc[1:], catalog.iloc[1:])
    assert result.catalog["status"].iloc[0] == "ok" and result.catalog["cluster"].iloc[0] == ""
    assert (result.n_exact, result.n_near, result.n_clusters) == (0, 0, 0)


def test_cross_group_clusters_are_reported_and_transitive_chains_join() -> None:
    catalog = new_rows(
        [
            row(sha("a"), "0000", group="anna"),
            row(sha("b"), "000f", group="bob"),  # 4 bits from a
            row(sha("c"), "00ff", group="anna"),  # 4 bits from b, 8 from a: joined through b
            row(sha("d"), "ff00", group="dora"),
            row(sha("e"), "ff01", group="dora"),  # same group: a cluster, not a cross-group one
            row(sha("f"), "f0f0", group="finn"),
        ]
    )
    result = find_duplicates(catalog, threshold=4)
    assert result.n_clusters == 2
    assert result.cross_group_clusters == [["anna", "bob"]]
    clusters = result.catalog["cluster"].tolist()
    assert clusters[:3] == [sha("a")] * 3 and clusters[3:5] == [sha("d")] * 2 and clusters[5] == ""


def test_mixed_or_missing_hashes_raise() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        find_duplicates(new_rows([row(sha("a"), "0000"), row(sha("b"), "00000000")]), 2)
    with pytest.raises(ValueError, match="run the fingerprint stage"):
        find_duplicates(new_rows([row(sha("a"), "0000"), row(sha("b"), "")]), 2)
    empty = find_duplicates(new_rows([row(sha("a"), "", status="invalid:zero_bytes")]), 2)
    assert (empty.n_exact, empty.n_near, empty.n_clusters) == (0, 0, 0)


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC), dtype=float)
    return Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_reencoded_and_resized_copy_is_a_near_duplicate(workspace: Workspace) -> None:
    original = photo((320, 240), seed=7)
    variants = {
        "original": jpeg(original, 95),
        "copy": jpeg(original.resize((200, 150), Image.Resampling.LANCZOS), 60),
        "other": jpeg(photo((320, 240), seed=8), 95),
    }
    records = []
    for i, (name, data) in enumerate(variants.items()):
        digest, path = put_in_store(workspace, data, "jpg")
        size = Image.open(path).size
        records.append(
            {"sha256": digest, "path": workspace.relative(path), "label": "real", "group": name, "url": name,
             "status": "ok", "width": size[0], "height": size[1], "fetched_at": T0 + timedelta(minutes=i)}
        )  # fmt: skip
    hashed = fingerprint_catalog(workspace, new_rows(records), "phash", 8)
    result = find_duplicates(hashed, threshold=6)
    out = result.catalog.set_index("url")
    keeper = out.loc["original", "sha256"]
    assert out.loc["original", "status"] == "ok" and out.loc["other", "status"] == "ok"
    assert out.loc["copy", "status"] == f"duplicate_of:{keeper}"
    assert out.loc["copy", "cluster"] == out.loc["original", "cluster"] == keeper and out.loc["other", "cluster"] == ""
    assert result.n_near == 1 and result.cross_group_clusters == [["copy", "original"]]


def test_exact_copy_of_a_non_keeper_points_at_the_keeper() -> None:
    catalog = new_rows(
        [
            row(sha("a"), "0000", width=10, height=10, url="small"),
            row(sha("b"), "0001", width=20, height=20, url="large"),
            row(sha("a"), "0000", width=10, height=10, url="small again", fetched_at=T0 + timedelta(hours=1)),
        ]
    )
    result = find_duplicates(catalog, threshold=2)
    assert list(result.catalog["status"]) == [f"duplicate_of:{sha('b')}", "ok", f"duplicate_of:{sha('b')}"]
    assert (result.n_exact, result.n_near, result.n_clusters) == (1, 2, 1)  # the copy counts as exact and near
    assert set(result.catalog["cluster"]) == {sha("b")}


# --------------------------------------------------------------------------------------------------------------
# The production search (find_near_pairs on 64-bit hashes: the vectorised multi-index search) against brute force


@st.composite
def clustered_hashes(draw: st.DrawFn) -> list[int]:
    """64-bit hashes in a few clusters (a centre, then copies with a few bits flipped), plus lone random ones."""
    centres = draw(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), min_size=1, max_size=6))
    flips = st.lists(st.integers(min_value=0, max_value=63), max_size=12)
    members = draw(st.lists(st.tuples(st.sampled_from(centres), flips), max_size=50))
    hashes = [centre ^ sum({1 << bit for bit in bits}) for centre, bits in members]
    lone = draw(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), max_size=20))
    return draw(st.permutations(centres + hashes + lone))


@settings(max_examples=150, deadline=None)
@given(hashes=clustered_hashes(), threshold=st.integers(min_value=0, max_value=64))
def test_vectorised_search_finds_the_brute_force_pairs(hashes: list[int], threshold: int) -> None:
    assert find_near_pairs(hashes, threshold) == brute_force_pairs(hashes, threshold)


@settings(max_examples=60, deadline=None)
@given(
    hashes=clustered_hashes(),
    threshold=st.integers(min_value=0, max_value=16),
    batch=st.integers(min_value=1, max_value=64),
)
def test_vectorised_search_is_exact_across_batch_boundaries(hashes: list[int], threshold: int, batch: int) -> None:
    """Production batches _BATCH (4 M) candidate checks; tiny batches put the boundaries inside these small sets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedup, "_BATCH", batch)
        assert find_near_pairs(hashes, threshold) == brute_force_pairs(hashes, threshold)


@pytest.mark.parametrize("threshold", [0, 1, 4, 8, 10, 20, 32, 63, 64])
def test_vectorised_search_on_full_64_bit_hashes_with_many_pairs(threshold: int) -> None:
    hashes = planted_hashes(300, 64, seed=threshold) + [1 << 63]  # the top bit set: all 64 bits are searched
    expected = brute_force_pairs(hashes, threshold)
    assert find_near_pairs(hashes, threshold) == expected
    assert len(expected) >= 10, "the planted copies give pairs to find"
