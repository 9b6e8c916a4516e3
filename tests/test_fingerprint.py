"""Perceptual hashing of stored images: draft decoding, the per-sha cache, unhashable files, algorithms."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from pipeline_lib import fingerprint
from pipeline_lib.catalog import new_rows
from pipeline_lib.dedup import hamming
from pipeline_lib.fingerprint import (
    cache_path,
    fingerprint_catalog,
    fingerprint_catalog_with_stats,
    hash_image,
    hash_pair,
)
from pipeline_lib.workspace import Workspace, put_in_store


def smooth(size: tuple[int, int], seed: int = 0, noise: float = 0.0, cells: int = 6) -> Image.Image:
    """A smooth pattern: a seeded random cells x cells colour grid upsampled bicubically, optionally noisy.

    (Its spectrum has real low-frequency structure; a pure sine pattern has so few non-zero DCT coefficients that
    phash flips bits when the image is merely resized by one pixel.)
    """
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)
    if not noise:
        return image
    pixels = np.asarray(image, dtype=float) + rng.normal(0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def store(workspace: Workspace, data: bytes, ext: str, **fields: object) -> dict[str, object]:
    """Put bytes in the store and return a catalog record for them."""
    sha, path = put_in_store(workspace, data, ext)
    record = {"sha256": sha, "path": workspace.relative(path), "label": "real", "group": "g", "status": "ok"}
    record.update(fields)
    return record


def catalog_of(workspace: Workspace, n: int, start: int = 0) -> pd.DataFrame:
    return new_rows(store(workspace, encode(smooth((64, 48), seed), "PNG"), "png") for seed in range(start, start + n))


def test_identical_pixels_hash_identically_across_formats(tmp_path: Path) -> None:
    image = smooth((120, 90), seed=3)
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    image.save(png)
    image.save(bmp)
    assert hash_pair(png) == hash_pair(bmp)
    assert hash_image(png) == hash_image(png)
    other = tmp_path / "b.png"
    smooth((120, 90), seed=4).save(other)
    assert hash_image(other) != hash_image(png)


def test_hash_is_hex_of_hash_size_squared_bits(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    smooth((80, 80)).save(path)
    for size in (8, 16):
        main, second = hash_pair(path, "phash", size)
        assert len(main) == len(second) == size * size // 4
        int(main, 16), int(second, 16)


def test_draft_decoding_is_smaller_and_agrees_with_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(smooth((1000, 800), seed=1, noise=3), "JPEG", quality=90))
    drafted = fingerprint.reduced_luma(path, 8, draft=True)
    full = fingerprint.reduced_luma(path, 8, draft=False)
    # 1/8 scale (125x100, both sides >= 8 * hash_size = 64), then no further integer box reduce fits
    assert drafted.shape == full.shape == (100, 125) and drafted.dtype == full.dtype == np.float32
    difference = np.abs(drafted.astype(float) - full)
    assert difference.mean() < 0.5 and difference.max() < 2  # DCT scaling is a box average up to rounding
    assert not np.array_equal(np.rint(full), full)  # the full-decode reduce is not rounded to 8 bits
    for algorithm in ("phash", "dhash"):
        assert hash_image(path, algorithm, 8, draft=True) == hash_image(path, algorithm, 8, draft=False), algorithm
    for algorithm in ("ahash", "whash"):  # imagehash on the image rounded to 8 bits: ties may still flip a bit
        fast = int(hash_image(path, algorithm, 8, draft=True), 16)
        slow = int(hash_image(path, algorithm, 8, draft=False), 16)
        assert hamming(fast, slow) <= 2, algorithm


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: low-frequency colour field, a few ellipses, pixel noise (as benchmarks/bench_hashing)."""
    width, height = size
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - width // 8)), int(rng.integers(0, height - height // 8))
        x1, y1 = x0 + int(rng.integers(width // 40, width // 4)), y0 + int(rng.integers(height // 40, height // 4))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_draft_and_full_decode_hash_equally(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    for seed in range(4):
        path.write_bytes(encode(photo((1600, 1200), seed), "JPEG", quality=90))
        assert fingerprint.reduced_luma(path, 8, draft=True).shape == (75, 100)  # 1/8 then a box reduce by 2
        assert hash_pair(path, "phash", 8, draft=True) == hash_pair(path, "phash", 8, draft=False), seed
        fast, slow = hash_pair(path, "phash", 16, draft=True), hash_pair(path, "phash", 16, draft=False)
        assert hamming(int(fast[0], 16), int(slow[0], 16)) <= 2, seed  # 256 bits: more coefficients near ties


def reference_box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Block means of the edge-replicated image, written independently of fingerprint.box_reduce."""
    height, width = pixels.shape
    rows, columns = -(-height // factor), -(-width // factor)
    row_index = np.minimum(np.arange(rows * factor), height - 1)
    column_index = np.minimum(np.arange(columns * factor), width - 1)
    padded = pixels.astype(np.float64)[np.ix_(row_index, column_index)]
    return padded.reshape(rows, factor, columns, factor).mean(axis=(1, 3))


def reference_hex(bits: np.ndarray) -> str:
    """Bits (row-major) as imagehash writes them: one big-endian binary number in zero-padded hex."""
    text = "".join("1" if bit else "0" for bit in bits.flatten())
    return format(int(text, 2), f"0{len(text) // 4}x")


def reference_float_hashes(luma: np.ndarray, hash_size: int = 8) -> dict[str, str]:
    """phash and dhash of a float image as imagehash defines them, without 8-bit rounding."""
    import scipy.fftpack

    image = Image.fromarray(luma.astype(np.float32))
    small = np.asarray(image.resize((4 * hash_size, 4 * hash_size), Image.Resampling.LANCZOS), dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=0), axis=1)[:hash_size, :hash_size]
    wide = np.asarray(image.resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.float64)
    return {"phash": reference_hex(low > np.median(low)), "dhash": reference_hex(wide[:, 1:] > wide[:, :-1])}


def test_full_decode_hash_is_the_float_hash_of_the_box_reduced_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(smooth((1601, 1203), seed=8, noise=6), "JPEG", quality=90))
    with Image.open(path) as image:
        image.draft("L", None)  # the luma plane at full resolution
        luma = np.asarray(image.convert("L"))
    assert luma.shape == (1203, 1601)
    assert fingerprint.draft_scale((1601, 1203), 64) == 8
    reduced = reference_box_reduce(reference_box_reduce(luma, 8), 2)  # 201x151, then k = 201 // 64, 151 // 64 -> 2
    assert reduced.shape == (76, 101)
    np.testing.assert_allclose(fingerprint.reduced_luma(path, 8, draft=False), reduced, atol=1e-4)
    grey = Image.fromarray(np.clip(np.rint(reduced), 0, 255).astype(np.uint8))
    expected = {
        **reference_float_hashes(reduced),
        "ahash": str(imagehash.average_hash(grey)),
        "whash": str(imagehash.whash(grey, image_scale=32)),
    }
    for algorithm, value in expected.items():
        assert hash_image(path, algorithm, 8, draft=False) == value, algorithm
    assert hash_pair(path, "ahash", 8, draft=False)[1] == expected["dhash"]
    png = tmp_path / "small.png"
    smooth((300, 200), seed=9).save(png)  # other formats: RGB -> L, then the same box reduces (300x200 -> 150x100)
    with Image.open(png) as image:
        grey_png = np.asarray(image.convert("L"))
    assert hash_pair(png) == tuple(reference_float_hashes(reference_box_reduce(grey_png, 2)).values())


def test_float_hashes_match_imagehash_on_an_image_of_the_final_size() -> None:
    rng = np.random.default_rng(5)
    square = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)  # resizing to its own size changes nothing
    assert str(imagehash.ImageHash(fingerprint.phash_bits(square.astype(np.float32), 8))) == str(
        imagehash.phash(Image.fromarray(square))
    )
    wide = rng.integers(0, 256, size=(8, 9), dtype=np.uint8)
    assert str(imagehash.ImageHash(fingerprint.dhash_bits(wide.astype(np.float32), 8))) == str(
        imagehash.dhash(Image.fromarray(wide))
    )


def test_draft_scale_follows_pil_draft() -> None:
    assert fingerprint.draft_scale((2309, 1732), 64) == 8
    assert fingerprint.draft_scale((500, 300), 64) == 4
    assert fingerprint.draft_scale((200, 200), 64) == 2
    assert fingerprint.draft_scale((100, 60), 64) == 1
    assert fingerprint.reduced_size((2309, 1732), 8) == (289, 217)


def test_unusual_modes_hash(tmp_path: Path) -> None:
    photo = smooth((64, 64), seed=2)
    levels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    files = {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "la.png": encode(photo.convert("LA"), "PNG"),
        "sixteen.png": encode(Image.fromarray(levels), "PNG"),
        "palette.gif": encode(photo.convert("P"), "GIF"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert len(hash_image(tmp_path / name)) == 16, name


def test_bad_parameters_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    smooth((40, 40)).save(path)
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        hash_image(path, "md5")
    with pytest.raises(ValueError, match="power-of-two hash_size, got 6"):
        hash_image(path, "whash", 6)
    with pytest.raises(ValueError, match="hash_size must be >= 2"):
        hash_image(path, "phash", 1)


def test_catalog_fills_ok_rows_and_hashes_each_sha_once(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    twice = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    invalid = new_rows([{"sha256": "f" * 64, "path": "quarantine/x.jpg", "label": "ai", "status": "invalid:truncated"}])
    result = fingerprint_catalog_with_stats(workspace, pd.concat([twice, invalid], ignore_index=True), "phash", 8)
    out = result.catalog
    assert (result.n_hashed, result.n_cached, result.n_unhashable) == (3, 0, 0)
    assert list(out["status"]) == ["ok"] * 4 + ["invalid:truncated"]
    assert (out["phash"].iloc[:4].str.len() == 16).all() and (out["dhash"].iloc[:4].str.len() == 16).all()
    assert out["phash"].iloc[0] == out["phash"].iloc[3]
    assert out["phash"].iloc[4] == "" and out["dhash"].iloc[4] == ""
    expected = hash_pair(workspace.root / out["path"].iloc[1], "phash", 8)
    assert (out["phash"].iloc[1], out["dhash"].iloc[1]) == expected


def test_cache_is_reused_and_extended(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    first = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    cache = cache_path(workspace, "phash", 8)
    assert cache == workspace.cache / "hashes" / f"phash-8-v{fingerprint.HASH_VERSION}.parquet"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    again = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    assert (again.n_hashed, again.n_cached) == (0, 3)
    assert cache.stat().st_mtime_ns == mtime  # nothing new: the cache is not rewritten
    pd.testing.assert_frame_equal(again.catalog, first.catalog)
    grown = pd.concat([table, catalog_of(workspace, 2, start=10)], ignore_index=True)
    more = fingerprint_catalog_with_stats(workspace, grown, "phash", 8)
    assert (more.n_hashed, more.n_cached) == (2, 3)
    assert sorted(pd.read_parquet(cache)["sha256"]) == sorted(grown["sha256"])
    assert not list(cache.parent.glob("*.part"))


def test_cached_hashes_are_used_without_reading_images(workspace: Workspace) -> None:
    table = catalog_of(workspace, 2)
    first = fingerprint_catalog(workspace, table, "phash", 8)
    for path in table["path"]:
        (workspace.root / path).unlink()  # a re-run must not need the files again
    assert list(fingerprint_catalog(workspace, table, "phash", 8)["phash"]) == list(first["phash"])


def test_unreadable_cache_is_rebuilt(workspace: Workspace) -> None:
    table = catalog_of(workspace, 2)
    cache = cache_path(workspace, "phash", 8)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not parquet")
    result = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    assert result.n_hashed == 2
    assert len(pd.read_parquet(cache)) == 2


def test_corrupt_file_at_hash_time_becomes_unhashable(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    broken = workspace.root / table["path"].iloc[1]
    broken.write_bytes(broken.read_bytes()[:40])  # damaged after validation
    (workspace.root / table["path"].iloc[2]).unlink()  # gone after validation
    result = fingerprint_catalog_with_stats(workspace, table, "phash", 8)
    status = list(result.catalog["status"])
    assert status[0] == "ok" and result.catalog["phash"].iloc[0] != ""
    assert status[1].startswith("invalid:unhashable:") and status[1] != "invalid:unhashable:"
    assert status[2] == "invalid:unhashable:FileNotFoundError"
    assert result.catalog["phash"].iloc[1] == "" and result.n_unhashable == 2
    assert list(pd.read_parquet(cache_path(workspace, "phash", 8))["sha256"]) == [table["sha256"].iloc[0]]


def test_algorithm_switch_uses_its_own_cache(workspace: Workspace) -> None:
    table = catalog_of(workspace, 4)
    by_algorithm = {name: fingerprint_catalog(workspace, table, name, 8) for name in ("phash", "whash", "ahash")}
    assert by_algorithm["phash"]["phash"].tolist() != by_algorithm["ahash"]["phash"].tolist()
    assert by_algorithm["phash"]["phash"].tolist() != by_algorithm["whash"]["phash"].tolist()
    for frame in by_algorithm.values():  # the second opinion is the same dhash whatever the algorithm
        assert frame["dhash"].tolist() == by_algorithm["phash"]["dhash"].tolist()
    names = sorted(p.name for p in (workspace.cache / "hashes").iterdir())
    assert names == [f"{name}-8-v{fingerprint.HASH_VERSION}.parquet" for name in ("ahash", "phash", "whash")]
    larger = fingerprint_catalog(workspace, table, "phash", 16)
    assert (larger["phash"].str.len() == 64).all()


def test_process_pool_matches_sequential(workspace: Workspace, monkeypatch) -> None:
    n = 24
    monkeypatch.setattr(fingerprint, "PARALLEL_MIN_IMAGES", n)
    table = catalog_of(workspace, n)
    broken = workspace.root / table["path"].iloc[5]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    parallel = fingerprint_catalog_with_stats(workspace, table, "dhash", 8, workers=2)
    sequential = fingerprint_catalog_with_stats(workspace, table, "dhash", 8, workers=1)
    assert parallel.n_hashed == n - 1 and parallel.n_unhashable == 1
    assert sequential.n_hashed == 0 and sequential.n_cached == n - 1
    pd.testing.assert_frame_equal(parallel.catalog, sequential.catalog)
    assert parallel.catalog["status"].iloc[5].startswith("invalid:unhashable:")


def test_planned_chunks_hash_and_merge_like_the_one_call(workspace: Workspace) -> None:
    table = catalog_of(workspace, 5)
    twice = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    fingerprint_catalog(workspace, table.iloc[:2], "phash", 8)  # two already cached
    jobs = fingerprint.missing_hash_jobs(workspace, twice, "phash", 8)
    assert [sha for sha, _ in jobs] == list(table["sha256"].iloc[2:])
    assert all(not Path(path).is_absolute() for _, path in jobs)
    chunks = fingerprint.chunked(jobs, 2)
    assert [len(chunk) for chunk in chunks] == [2, 1]
    rows = [row for chunk in chunks for row in fingerprint.hash_jobs(workspace, chunk, "phash", 8)]
    assert all(error == "" for *_, error in rows)
    merged, stats = fingerprint.merge_hash_rows(workspace, twice, rows, "phash", 8)
    assert stats == {"hashed": 3, "cached": 2, "unhashable": 0}
    expected = [hash_pair(workspace.root / path, "phash", 8) for path in twice["path"]]
    assert list(zip(merged["phash"], merged["dhash"], strict=True)) == expected
    assert fingerprint.missing_hash_jobs(workspace, twice, "phash", 8) == []
    with pytest.raises(ValueError, match="chunk size"):
        fingerprint.chunked(jobs, 0)


def test_merge_records_unhashable_rows_and_hashes_what_the_plan_missed(workspace: Workspace) -> None:
    table = catalog_of(workspace, 3)
    jobs = fingerprint.missing_hash_jobs(workspace, table, "phash", 8)
    (workspace.root / jobs[1][1]).write_bytes(b"garbage")  # damaged after validation
    rows = fingerprint.hash_jobs(workspace, jobs[:2], "phash", 8)  # the third image is not in any chunk
    assert rows[1][3] != "" and rows[1][1] == ""
    merged, stats = fingerprint.merge_hash_rows(workspace, table, rows, "phash", 8)
    assert stats == {"hashed": 2, "cached": 0, "unhashable": 1}
    assert merged["status"].iloc[1].startswith("invalid:unhashable:")
    assert merged["phash"].iloc[2] == hash_pair(workspace.root / table["path"].iloc[2])[0]
    assert sorted(pd.read_parquet(cache_path(workspace, "phash", 8))["sha256"]) == sorted(
        table["sha256"].iloc[[0, 2]]
    )
