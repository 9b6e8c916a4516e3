"""Ingest: crawled files validated once, moved byte-identical to store/ or quarantine/, cataloged in log order."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_lib.acquire import jobs
from pipeline_lib.acquire.crawl import crawl_sources
from pipeline_lib.acquire.fingerprint import cache_path, fingerprint_catalog_with_stats, missing_hash_jobs, read_cache
from pipeline_lib.acquire.hashing import hash_pair
from pipeline_lib.acquire.ingest import (
    LOG_COLUMNS,
    VALIDATION_PRODUCERS,
    checks_by_sha,
    files_to_ingest,
    hashes_by_sha,
    ingest,
    ingest_summary,
    records_folder,
    validate_files,
    validation_jobs,
    validation_record_path,
)
from pipeline_lib.core.catalog import COLUMNS
from pipeline_lib.core.config import FolderSource, IngestConfig, SourcesConfig
from pipeline_lib.core.workspace import Workspace, bytes_sha256, file_sha256
from tests.project_copy import copy_project, digest_in, edit

CONFIG = IngestConfig(min_side=16, max_pixels=10_000_000)
HASHING = ("phash", 8)
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC), dtype=float)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class Crawled:
    """One crawled file: its bytes, extension and the status ingest must give it."""

    name: str
    data: bytes
    ext: str
    status: str
    mode: str = ""


def crawled_files() -> list[Crawled]:
    jpeg = encode(photo(seed=1), "JPEG")
    sixteen = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    html = b"<!DOCTYPE html><html><head><title>Blocked</title></head><body>captcha</body></html>"
    return [
        Crawled("good_jpeg", jpeg, "jpg", "ok", "RGB"),
        Crawled("good_png", encode(photo(seed=2), "PNG"), "png", "ok", "RGB"),
        Crawled("zero", b"", "jpg", "invalid:zero_bytes"),
        Crawled("truncated", jpeg[: len(jpeg) // 2], "jpg", "invalid:truncated"),
        Crawled("html", html, "jpg", "invalid:not_an_image:html"),
        Crawled("small", encode(photo((8, 30), seed=3), "PNG"), "png", "invalid:too_small"),
        Crawled("cmyk", encode(photo(seed=4).convert("CMYK"), "JPEG"), "jpg", "ok", "CMYK"),
        Crawled("la", encode(photo(seed=5).convert("LA"), "PNG"), "png", "ok", "LA"),
        Crawled("sixteen", encode(Image.fromarray(sixteen), "PNG"), "png", "ok", "I;16"),
    ]


def log_row(sha: str, ext: str, name: str, minutes: int, n_bytes: int, error: str = "") -> dict[str, object]:
    return {
        "sha256": sha,
        "ext": ext,
        "url": f"https://example.test/{name}.{ext}",
        "source": "search:bing",
        "keyword": name,
        "label": "real",
        "group": name,
        "generator": "camera",
        "fetched_at": T0 + timedelta(minutes=minutes),
        "n_bytes": n_bytes,
        "error": error,
    }


def place_incoming(workspace: Workspace, data: bytes, ext: str) -> str:
    sha = bytes_sha256(data)
    path = workspace.incoming / sha[:2] / f"{sha}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha


def crawl(workspace: Workspace, files: list[Crawled]) -> pd.DataFrame:
    """Put each file in incoming/ and return its crawl log (plus one failed download)."""
    rows = [
        log_row(place_incoming(workspace, item.data, item.ext), item.ext, item.name, i, len(item.data))
        for i, item in enumerate(files)
    ]
    rows.append(log_row("", "", "failed", 99, 0, error="HTTP 404"))
    return pd.DataFrame(rows)


def test_every_file_gets_its_status_and_place(workspace: Workspace) -> None:
    files = crawled_files()
    catalog = ingest(workspace, crawl(workspace, files), CONFIG)
    assert list(catalog.columns) == list(COLUMNS)
    assert list(catalog["keyword"]) == [item.name for item in files]  # log order; the failed download is dropped
    assert dict(zip(catalog["keyword"], catalog["status"], strict=True)) == {item.name: item.status for item in files}
    for item, entry in zip(files, catalog.itertuples(), strict=True):
        stored = workspace.root / entry.path
        assert stored.is_file() and stored.read_bytes() == item.data, item.name
        assert file_sha256(stored) == entry.sha256 == stored.stem, item.name
        folder = "store" if item.status == "ok" else "quarantine"
        assert entry.path.startswith(f"{folder}/") and stored.suffix == f".{item.ext}", item.name
        assert entry.n_bytes == len(item.data)
        if item.mode:
            assert entry.mode == item.mode and entry.width > 0 and entry.height > 0
    assert not [p for p in workspace.incoming.rglob("*") if p.is_file()], "incoming/ must be emptied"
    good = catalog.set_index("keyword").loc["good_jpeg"]
    assert (good["width"], good["height"], good["format"]) == (64, 48, "JPEG")
    assert good["url"] == "https://example.test/good_jpeg.jpg" and good["generator"] == "camera"


def test_summary_counts_reasons(workspace: Workspace) -> None:
    catalog = ingest(workspace, crawl(workspace, crawled_files()), CONFIG)
    assert ingest_summary(catalog) == {
        "ok": 5,
        "invalid": 4,
        "invalid.not_an_image": 1,
        "invalid.too_small": 1,
        "invalid.truncated": 1,
        "invalid.zero_bytes": 1,
    }


def test_second_ingest_reuses_validation_records(workspace: Workspace) -> None:
    crawl_log = crawl(workspace, crawled_files())
    first = ingest(workspace, crawl_log, CONFIG)
    records = {sha: validation_record_path(workspace, sha, CONFIG) for sha in first["sha256"]}
    assert all(path.is_file() for path in records.values())
    stamps = {sha: path.stat().st_mtime_ns for sha, path in records.items()}
    placed = {path: (workspace.root / path).stat().st_mtime_ns for path in first["path"]}
    second = ingest(workspace, crawl_log, CONFIG)
    pd.testing.assert_frame_equal(first, second)
    assert {sha: path.stat().st_mtime_ns for sha, path in records.items()} == stamps, "files were validated again"
    assert {path: (workspace.root / path).stat().st_mtime_ns for path in second["path"]} == placed


def test_validation_records_are_named_by_the_code_that_judged_the_files(workspace: Workspace, tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    before = digest_in(root, *VALIDATION_PRODUCERS)
    folder = records_folder(workspace, CONFIG)
    assert folder.name == f"min16-px10000000-first_frame-{before[:16]}", "the copy holds the checkout's code"
    edit(root, "pipeline_lib/acquire/ingest.py", 'MISSING_FILE = "missing_file"', 'MISSING_FILE = "gone"')
    assert digest_in(root, *VALIDATION_PRODUCERS) == before, "ingest's bookkeeping judges no file"
    edit(root, "pipeline_lib/acquire/validate.py", "if min_side < 1 or max_pixels < 1:", "if min_side < 2:")
    assert digest_in(root, *VALIDATION_PRODUCERS) != before, "a change of validate must judge every file again"


def test_another_ingest_policy_judges_every_file_again(workspace: Workspace) -> None:
    crawl_log = crawl(workspace, crawled_files())
    first = ingest(workspace, crawl_log, CONFIG)
    small = first.set_index("keyword").loc["small"]
    assert small["status"] == "invalid:too_small" and small["path"].startswith("quarantine/")

    # min_side 8 admits the 8x30 image: it is judged again and moves from quarantine/ to store/
    lenient = IngestConfig(min_side=8, max_pixels=CONFIG.max_pixels)
    second = ingest(workspace, crawl_log, lenient).set_index("keyword")
    assert second.loc["small", "status"] == "ok" and second.loc["small", "path"].startswith("store/")
    assert (workspace.root / second.loc["small", "path"]).is_file()
    assert validation_record_path(workspace, small["sha256"], lenient).is_file()

    # back to the first policy: its records say too_small, the file goes back to quarantine/
    again = ingest(workspace, crawl_log, CONFIG)
    pd.testing.assert_frame_equal(again, first)
    assert (workspace.root / small["path"]).is_file()

    # animated=reject and max_pixels are part of the policy too
    for changed in (CONFIG.model_copy(update={"animated": "reject"}), CONFIG.model_copy(update={"max_pixels": 999})):
        assert validation_jobs(workspace, files_to_ingest(crawl_log), changed), f"{changed} reused another policy"


def test_recrawled_copy_is_dropped_from_incoming(workspace: Workspace) -> None:
    good = crawled_files()[0]
    crawl_log = crawl(workspace, [good])
    first = ingest(workspace, crawl_log, CONFIG)
    sha = place_incoming(workspace, good.data, good.ext)  # downloaded again later
    again = ingest(workspace, crawl_log, CONFIG)
    assert not (workspace.incoming / sha[:2] / f"{sha}.{good.ext}").exists()
    pd.testing.assert_frame_equal(first, again)


def test_same_file_twice_in_log_gives_two_rows_one_file(workspace: Workspace) -> None:
    good = crawled_files()[1]
    sha = place_incoming(workspace, good.data, good.ext)
    crawl_log = pd.DataFrame([log_row(sha, "png", "first", 0, len(good.data)), log_row(sha, "png", "second", 5, 0)])
    catalog = ingest(workspace, crawl_log, CONFIG)
    assert list(catalog["status"]) == ["ok", "ok"] and catalog["path"].nunique() == 1
    assert list(catalog["group"]) == ["first", "second"]


def test_missing_file_and_wrong_content(workspace: Workspace) -> None:
    good = crawled_files()[0]
    sha_missing = bytes_sha256(b"never written")
    liar = place_incoming(workspace, good.data, "jpg")
    (workspace.incoming / liar[:2] / f"{liar}.jpg").write_bytes(encode(photo(seed=9), "JPEG"))  # name != content
    crawl_log = pd.DataFrame([log_row(sha_missing, "jpg", "missing", 0, 1234), log_row(liar, "jpg", "liar", 1, 10)])
    catalog = ingest(workspace, crawl_log, CONFIG).set_index("keyword")
    assert catalog.loc["missing", "status"] == "invalid:missing_file"
    assert catalog.loc["missing", "path"] == "" and catalog.loc["missing", "n_bytes"] == 1234
    assert catalog.loc["liar", "status"] == "invalid:sha_mismatch"
    assert catalog.loc["liar", "path"].startswith("quarantine/")


def test_empty_log_and_failed_downloads_give_empty_catalog(workspace: Workspace) -> None:
    crawl_log = pd.DataFrame([log_row("", "", "failed", 0, 0, error="timeout")])
    catalog = ingest(workspace, crawl_log, CONFIG)
    assert catalog.empty and list(catalog.columns) == list(COLUMNS)


@pytest.mark.parametrize("column", LOG_COLUMNS)
def test_log_missing_a_column_is_named(workspace: Workspace, column: str) -> None:
    crawl_log = crawl(workspace, crawled_files()[:1]).drop(columns=[column])
    with pytest.raises(ValueError, match=f"crawl log is missing columns \\['{column}'\\]"):
        ingest(workspace, crawl_log, CONFIG)


def test_process_pool_validation_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the pool forced, results must equal a sequential ingest of the same files."""
    monkeypatch.setattr(jobs, "WORKER_STARTUP_S", 0.0)
    monkeypatch.setattr(jobs, "idle_cores", lambda: 2.0)
    files = [Crawled(f"img{i}", encode(photo(seed=100 + i), "PNG"), "png", "ok") for i in range(63)]
    files.append(Crawled("zero", b"", "jpg", "invalid:zero_bytes"))
    pooled_ws, serial_ws = Workspace.create(tmp_path / "pool"), Workspace.create(tmp_path / "serial")
    pooled = ingest(pooled_ws, crawl(pooled_ws, files), CONFIG, workers=2)
    serial = ingest(serial_ws, crawl(serial_ws, files), CONFIG, workers=1)
    pd.testing.assert_frame_equal(pooled, serial)
    assert list(pooled["status"]) == [item.status for item in files]


def test_planned_chunk_checks_give_the_same_catalog_as_ingest(tmp_path: Path) -> None:
    """plan (validation_jobs) -> validate_files per chunk (moves nothing) -> ingest with the checks == plain ingest."""
    files = crawled_files()
    mapped_ws, plain_ws = Workspace.create(tmp_path / "mapped"), Workspace.create(tmp_path / "plain")
    crawl_log = crawl(mapped_ws, files)
    wanted = files_to_ingest(crawl_log)
    jobs = validation_jobs(mapped_ws, wanted, CONFIG)
    assert sorted(sha for sha, _ in jobs) == sorted(wanted) and all(p.startswith("incoming/") for _, p in jobs)
    rows = validate_files(mapped_ws, jobs[:3], CONFIG) + validate_files(mapped_ws, jobs[3:], CONFIG)
    assert all((mapped_ws.root / path).is_file() for _, path in jobs), "validation must not move files"
    assert not list(mapped_ws.cache.glob("validation/**/*.json")), "validation must not write records"
    checks = checks_by_sha(rows)
    assert checks[bytes_sha256(files[0].data)].ok is (files[0].status == "ok")
    mapped = ingest(mapped_ws, crawl_log, CONFIG, checks=checks)
    plain = ingest(plain_ws, crawl(plain_ws, files), CONFIG)
    pd.testing.assert_frame_equal(mapped.drop(columns="fetched_at"), plain.drop(columns="fetched_at"))
    assert validation_jobs(mapped_ws, wanted, CONFIG) == [], "placed files have reusable records"
    assert not [p for p in mapped_ws.incoming.rglob("*") if p.is_file()]


def test_a_planned_chunk_run_again_after_ingest_validates_the_stored_copies(workspace: Workspace) -> None:
    """A plan kept in the cache names incoming/ files that ingest has moved since (issue 24, item 9): validating its
    chunk again checks the stored or quarantined copy of each sha256; a file gone from everywhere is left out."""
    files = crawled_files()
    crawl_log = crawl(workspace, files)
    jobs = validation_jobs(workspace, files_to_ingest(crawl_log), CONFIG)
    before = validate_files(workspace, jobs, CONFIG, HASHING)
    catalog = ingest(workspace, crawl_log, CONFIG, checks=checks_by_sha(before))
    assert not [p for p in workspace.incoming.rglob("*") if p.is_file()], "ingest moved every file"
    assert validate_files(workspace, jobs, CONFIG, HASHING) == before
    gone = catalog[catalog["status"] == "ok"].iloc[0]
    (workspace.root / gone["path"]).unlink()
    kept = [row for row in before if row["sha256"] != gone["sha256"]]
    assert validate_files(workspace, jobs, CONFIG, HASHING) == kept


def _assert_hashes_cached(workspace: Workspace, catalog: pd.DataFrame, hashing: tuple[str, int]) -> None:
    """The cache holds exactly the ok files, with the values the fingerprint stage's own decode gives."""
    cache = read_cache(cache_path(workspace, *hashing)).set_index("sha256")
    ok = catalog[catalog["status"] == "ok"].drop_duplicates("sha256")
    assert sorted(cache.index) == sorted(ok["sha256"])
    for sha, path in zip(ok["sha256"], ok["path"], strict=True):
        assert tuple(cache.loc[sha, ["phash", "dhash"]]) == hash_pair(workspace.root / path, *hashing), path


def test_ingest_fills_the_hash_cache_and_a_fingerprint_after_it_hashes_nothing_new(workspace: Workspace) -> None:
    files = crawled_files() + [Crawled("big", encode(photo((1200, 900), seed=7), "JPEG"), "jpg", "ok", "RGB")]
    catalog = ingest(workspace, crawl(workspace, files), CONFIG, hashing=HASHING)
    _assert_hashes_cached(workspace, catalog, HASHING)
    result = fingerprint_catalog_with_stats(workspace, catalog, *HASHING)
    n_ok = catalog.loc[catalog["status"] == "ok", "sha256"].nunique()
    assert (result.n_hashed, result.n_cached, result.n_unhashable) == (0, n_ok, 0)
    assert missing_hash_jobs(workspace, catalog, *HASHING) == [], "the fingerprint stage's plan is empty"
    other = fingerprint_catalog_with_stats(workspace, catalog, "dhash", 8)  # another algorithm: gaps are filled
    assert other.n_hashed == n_ok


def test_planned_chunks_with_hashing_fill_the_cache_like_ingest(tmp_path: Path) -> None:
    files = crawled_files()
    mapped_ws, plain_ws = Workspace.create(tmp_path / "mapped"), Workspace.create(tmp_path / "plain")
    crawl_log = crawl(mapped_ws, files)
    jobs = validation_jobs(mapped_ws, files_to_ingest(crawl_log), CONFIG)
    rows = validate_files(mapped_ws, jobs[:4], CONFIG, HASHING) + validate_files(mapped_ws, jobs[4:], CONFIG, HASHING)
    assert {row["sha256"] for row in rows if row["phash"]} == {row["sha256"] for row in rows if row["ok"]}
    assert not cache_path(mapped_ws, *HASHING).exists(), "chunks only compute; the merge writes the cache"
    hashes = hashes_by_sha(rows)
    mapped = ingest(mapped_ws, crawl_log, CONFIG, checks=checks_by_sha(rows), hashing=HASHING, hashes=hashes)
    plain = ingest(plain_ws, crawl(plain_ws, files), CONFIG, hashing=HASHING)
    pd.testing.assert_frame_equal(mapped.drop(columns="fetched_at"), plain.drop(columns="fetched_at"))
    pd.testing.assert_frame_equal(
        read_cache(cache_path(mapped_ws, *HASHING)), read_cache(cache_path(plain_ws, *HASHING))
    )


def test_files_to_ingest_names_a_missing_column() -> None:
    with pytest.raises(ValueError, match="label"):
        files_to_ingest(pd.DataFrame({name: [] for name in LOG_COLUMNS if name != "label"}))


# --------------------------------------------------------------------------------------------------------------
# A corpus of malformed and unusual files, through a real folder crawl and ingest


def _png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR (CRC fixed up) declares width x height: a decompression bomb by header."""
    data = bytearray(encode(photo((8, 8), seed=40), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [photo((40, 40), seed=50 + i).convert("P") for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[274] = 6
    return _save(photo((64, 40), seed=51), "JPEG", exif=exif.tobytes())


def _palette_transparent() -> bytes:
    image = photo((40, 40), seed=52).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    return _save(Image.fromarray((np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 37).astype(np.uint16)), "PNG")


@dataclass(frozen=True)
class Odd:
    """A file of the corpus: its name in the folder, bytes, expected status (each policy), ext, mode."""

    name: str
    data: bytes
    status: str
    ext: str
    mode: str = ""
    status_if_reject: str = ""


def odd_files() -> list[Odd]:
    """Malformed and unusual files with the catalog status each must get (min_side 16, first_frame policy)."""
    jpeg, png = encode(photo(seed=60), "JPEG"), encode(photo(seed=61), "PNG")
    gif, webp = _save(photo(seed=62).convert("P"), "GIF"), _save(photo(seed=63), "WEBP")
    html = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>captcha</body></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200"><rect width="9" height="9"/></svg>'
    return [
        Odd("zero.jpg", b"", "invalid:zero_bytes", "jpg"),
        Odd("cut.jpg", jpeg[: len(jpeg) // 2], "invalid:truncated", "jpg"),
        Odd("cut.png", png[: len(png) // 2], "invalid:truncated", "png"),
        Odd("cut.gif", gif[: len(gif) // 2], "invalid:truncated", "gif"),
        Odd("cut.webp", webp[: len(webp) // 2], "invalid:truncated", "webp"),
        Odd("page.jpg", html, "invalid:not_an_image:html", "jpg"),
        Odd("logo.jpg", svg, "invalid:not_an_image:svg", "jpg"),
        Odd("readme.jpg", b"nothing to see here,\njust text\n", "invalid:not_an_image:text", "jpg"),
        Odd("paper.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "invalid:not_an_image:pdf", "jpg"),
        Odd("api.jpg", b'{"error": "rate limited", "retry_after": 60}', "invalid:not_an_image:json", "jpg"),
        Odd("bomb.png", _png_claiming(100_000, 100_000), "invalid:decompression_bomb", "png"),
        Odd("tiny.png", encode(photo((12, 40), seed=64), "PNG"), "invalid:too_small", "png"),
        Odd("anim.gif", _animated_gif(), "ok", "gif", "P", status_if_reject="invalid:animated"),
        Odd("cmyk.jpg", encode(photo(seed=65).convert("CMYK"), "JPEG"), "ok", "jpg", "CMYK"),
        Odd("palette_alpha.png", _palette_transparent(), "ok", "png", "P"),
        Odd("sixteen.png", _sixteen_bit(), "ok", "png", "I;16"),
        Odd("la.png", encode(photo(seed=66).convert("LA"), "PNG"), "ok", "png", "LA"),
        Odd("bilevel.png", encode(photo(seed=67).convert("1"), "PNG"), "ok", "png", "1"),
        Odd("rotated.jpg", _exif_rotated(), "ok", "jpg", "RGB"),
        Odd("photo.webp", webp, "ok", "webp", "RGB"),
        Odd("photo.bmp", encode(photo(seed=68), "BMP"), "ok", "bmp", "RGB"),
        Odd("photo.tiff", encode(photo(seed=69), "TIFF"), "ok", "tiff", "RGB"),
        Odd("progressive.jpg", _save(photo(seed=70), "JPEG", progressive=True), "ok", "jpg", "RGB"),
        Odd("trailing_garbage.jpg", encode(photo(seed=71), "JPEG") + b"\x00garbage" * 50, "ok", "jpg", "RGB"),
        Odd("really_a_jpeg.png", encode(photo(seed=72), "JPEG"), "ok", "jpg", "RGB"),
        Odd("plain.gif", gif, "ok", "gif", "P"),
    ]


@pytest.mark.parametrize(("policy", "hashing"), [("first_frame", None), ("reject", None), ("first_frame", HASHING)])
def test_malformed_corpus_through_folder_crawl_and_ingest(
    workspace: Workspace, tmp_path: Path, policy: str, hashing: tuple[str, int] | None
) -> None:
    """The same statuses whether ingest also hashes (a JPEG is then decoded DCT-scaled to luma) or not."""
    files = odd_files()
    assert len(files) >= 20 and len({item.data for item in files}) == len(files)
    folder = tmp_path / "drop"
    for item in files:
        (folder / "g").mkdir(parents=True, exist_ok=True)
        (folder / "g" / item.name).write_bytes(item.data)
    sources = SourcesConfig(folders=[FolderSource(path=folder, label="ai", generator="sd")])
    crawled = crawl_sources(workspace, sources, now=T0)
    assert (crawled.log["error"] == "").all() and len(crawled.log) == len(files)
    catalog = ingest(workspace, crawled.log, CONFIG.model_copy(update={"animated": policy}), hashing=hashing)
    assert len(catalog) == len(files), "count in must equal count out"
    if hashing is not None:
        _assert_hashes_cached(workspace, catalog, hashing)

    by_name = {Path(url).name: row for url, row in zip(catalog["url"], catalog.itertuples(), strict=True)}
    expected = {i.name: (i.status_if_reject or i.status) if policy == "reject" else i.status for i in files}
    assert {name: row.status for name, row in by_name.items()} == expected
    for item in files:
        row = by_name[item.name]
        placed = workspace.root / row.path
        assert placed.read_bytes() == item.data, f"{item.name} changed on its way to {row.path}"
        assert placed.name == f"{row.sha256}.{item.ext}", item.name
        assert row.path.startswith("store/" if row.status == "ok" else "quarantine/"), item.name
        if item.mode:
            assert (row.mode, row.width > 0, row.height > 0) == (item.mode, True, True), item.name
    assert by_name["rotated.jpg"].exif_orientation == 6 and pd.isna(by_name["cmyk.jpg"].exif_orientation)
    assert pd.isna(by_name["bomb.png"].width), "a bomb's size is not recorded: its header is refused"
    assert not [p for p in workspace.incoming.rglob("*") if p.is_file()], "incoming/ must be emptied"
    assert {p.name for p in folder.rglob("*") if p.is_file()} == {i.name for i in files}, "sources stay in place"
