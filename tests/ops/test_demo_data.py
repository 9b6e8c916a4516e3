"""Synthetic demo data: deterministic, with measurable class tells, injected problems, and a Bing-like site."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from icrawler.builtin.bing import BingParser
from PIL import Image

from pipeline_lib.core.config_loader import build_config
from pipeline_lib.core.workspace import file_sha256
from pipeline_lib.ops.demo_data import DemoDataset, demo_config_dict, generate_demo_dataset, search_site


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_persons_per_class=3, image_size=64)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _originals(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.stem.isdigit())


def test_same_seed_gives_the_same_files(tmp_path: Path, dataset: DemoDataset) -> None:
    again = generate_demo_dataset(tmp_path / "again", n_persons_per_class=3, image_size=64)
    assert _digests(again.site_dir) == _digests(dataset.site_dir)
    assert _digests(again.ai_dir) == _digests(dataset.ai_dir)
    other = generate_demo_dataset(tmp_path / "other", n_persons_per_class=3, image_size=64, seed=1)
    assert _digests(other.site_dir) != _digests(dataset.site_dir)


def test_counts_and_layout(dataset: DemoDataset) -> None:
    assert dataset.keywords == ["person-01", "person-02", "person-03"]
    assert sorted(p.name for p in dataset.site_dir.iterdir()) == dataset.keywords
    assert len(list(dataset.ai_dir.iterdir())) == 3
    real, ai = _originals(dataset.site_dir, ".jpg"), _originals(dataset.ai_dir, ".png")
    assert dataset.n_real_images == len(real) and dataset.n_ai_images == len(ai)
    for folder in [*dataset.site_dir.iterdir(), *dataset.ai_dir.iterdir()]:
        assert 2 <= len([p for p in folder.iterdir() if p.stem.isdigit()]) <= 4
    assert dataset.n_exact_duplicates >= 2 and dataset.n_near_duplicates >= 2 and dataset.n_corrupt >= 3
    for path in real:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    for path in ai:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)


def test_exact_duplicates_stay_inside_their_group(dataset: DemoDataset) -> None:
    for folder in (dataset.site_dir, dataset.ai_dir):
        by_sha: dict[str, list[str]] = {}
        for name, sha in _digests(folder).items():
            by_sha.setdefault(sha, []).append(name)
        dups = [names for names in by_sha.values() if len(names) > 1 and not any("empty" in n for n in names)]
        assert len(dups) == 1
        assert len({Path(name).parts[0] for name in dups[0]}) == 1


def test_near_duplicates_are_resized_to_90_percent(dataset: DemoDataset) -> None:
    near = sorted([*dataset.site_dir.rglob("near-*"), *dataset.ai_dir.rglob("near-*")])
    assert len(near) == dataset.n_near_duplicates
    for path in near:
        with Image.open(path) as image:
            assert image.size == (round(64 * 0.9), round(64 * 0.9))


def test_corrupt_files_do_not_decode(dataset: DemoDataset) -> None:
    corrupt = [
        *dataset.site_dir.rglob("broken-*"),
        *dataset.site_dir.rglob("removed-*"),
        *dataset.ai_dir.rglob("empty-*"),
    ]
    assert len(corrupt) == dataset.n_corrupt
    for path in corrupt:
        with pytest.raises(OSError):
            with Image.open(path) as image:
                image.load()
    assert any(p.read_bytes().startswith(b"<!doctype html") for p in corrupt)
    assert any(p.stat().st_size == 0 and p.suffix == ".png" for p in corrupt)


def _high_frequency_energy(path: Path) -> float:
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    lap = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float(np.abs(lap).mean())


def test_class_tells_are_measurable(dataset: DemoDataset) -> None:
    real = [_high_frequency_energy(p) for p in _originals(dataset.site_dir, ".jpg")]
    ai = [_high_frequency_energy(p) for p in _originals(dataset.ai_dir, ".png")]
    assert min(real) > 2 * max(ai), (real, ai)


def test_regeneration_reuses_an_intact_dataset_and_repairs_a_changed_one(dataset: DemoDataset) -> None:
    sample = _originals(dataset.site_dir, ".jpg")[0]
    before = sample.stat().st_mtime_ns
    assert generate_demo_dataset(dataset.root, n_persons_per_class=3, image_size=64) == dataset
    assert sample.stat().st_mtime_ns == before
    original = sample.read_bytes()
    sample.write_bytes(b"tampered")
    again = generate_demo_dataset(dataset.root, n_persons_per_class=3, image_size=64)
    assert again == dataset and sample.read_bytes() == original


def test_refuses_a_folder_that_is_not_demo_data(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="not a demo data folder"):
        generate_demo_dataset(tmp_path, n_persons_per_class=3, image_size=32)
    assert (tmp_path / "precious.txt").read_text(encoding="utf-8") == "keep me"
    with pytest.raises(ValueError, match="n_persons_per_class"):
        generate_demo_dataset(tmp_path / "x", n_persons_per_class=2)


def _parse(response: requests.Response) -> list[str]:
    parser = BingParser(1, None, None)
    return [task["file_url"] for task in parser.parse(response)]


def test_site_serves_pages_that_bing_parser_reads(dataset: DemoDataset) -> None:
    with search_site(dataset) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:") and "{keyword}" in endpoint and "{offset}" in endpoint
        served = 0
        for keyword in dataset.keywords:
            urls = _parse(requests.get(endpoint.format(keyword=keyword, offset=0), timeout=5))
            files = sorted(p.name for p in (dataset.site_dir / keyword).iterdir())
            assert sorted(url.rsplit("/", 1)[1] for url in urls) == files
            for url in urls:
                response = requests.get(url, timeout=5)
                assert response.status_code == 200
                assert response.content == (dataset.site_dir / keyword / url.rsplit("/", 1)[1]).read_bytes()
                served += 1
            assert _parse(requests.get(endpoint.format(keyword=keyword, offset=20), timeout=5)) == []
        assert served == dataset.n_real_images + 4  # + exact dup, near dup, truncated JPEG, HTML page
        assert _parse(requests.get(endpoint.format(keyword="nobody", offset=0), timeout=5)) == []
        port = int(endpoint.split(":")[2].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/img/../manifest.json")
        assert connection.getresponse().status == 404
        connection.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(endpoint.format(keyword="person-01", offset=0), timeout=2)


def test_demo_config_dict_is_a_valid_config(dataset: DemoDataset, tmp_path: Path) -> None:
    data = demo_config_dict(dataset, "http://127.0.0.1:9/images/async?q={keyword}&first={offset}", tmp_path)
    assert set(data) == {"sources", "report", "execution"}
    config = build_config(json.loads(json.dumps(data)))
    assert "SYNTHETIC" in config.report.data_note, "the report must say that the demo data is synthetic"
    search = config.sources.search[0]
    assert search.engine == "bing" and search.label == "real" and search.keywords == dataset.keywords
    assert config.sources.folders[0].path == dataset.ai_dir and config.sources.folders[0].label == "ai"
    assert config.sources.allow_private_addresses is True
    assert config.execution.workspace == tmp_path
