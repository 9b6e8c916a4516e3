"""Tests for pipeline_lib.predict: per-file p_ai and label, folders, batches, per-file errors, CAM overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_lib import models
from pipeline_lib.evaluate import predict_probabilities
from pipeline_lib.predict import PredictionRow, cam_file_name, collect_paths, predict_files
from pipeline_lib.preprocess import decode_image
from tests.conftest import make_image

SIZE = 32


@pytest.fixture(scope="module")
def model() -> models.Classifier:
    torch.manual_seed(0)
    built, _ = models.build_model("resnet18", "none")
    return built.eval()


def make_folder(root: Path) -> dict[str, Path]:
    """Good images (nested), a corrupt jpg, a text file and a non-image extension in a folder."""
    files = {
        "a": make_image(root / "a.jpg", seed=1),
        "b": make_image(root / "sub" / "b.png", seed=2, fmt="PNG"),
        "c": make_image(root / "sub" / "deeper" / "c.webp", seed=3, fmt="WEBP"),
        "d": make_image(root / "d.jpeg", seed=4, size=(70, 30)),
        "corrupt": root / "sub" / "corrupt.jpg",
        "notes": root / "notes.txt",
    }
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    files["notes"].write_text("not an image", encoding="utf-8")
    return files


def expected_p_ai(model: models.Classifier, path: Path) -> float:
    images = torch.from_numpy(decode_image(path, SIZE)[None])
    return float(predict_probabilities(model, images)[0])


def test_collect_paths_walks_folders_for_images_and_keeps_explicit_files(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "in")
    found = collect_paths([tmp_path / "in", files["notes"], files["a"]])
    names = [p.name for p in found]
    assert names[:5] == ["a.jpg", "d.jpeg", "b.png", "corrupt.jpg", "c.webp"], f"folder walk wrong: {names}"
    assert names[5:] == ["notes.txt"], f"an explicit file must be kept once, duplicates dropped: {names}"


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_predict_files_scores_good_files_and_reports_bad_ones(
    tmp_path: Path, model: models.Classifier, batch_size: int
) -> None:
    files = make_folder(tmp_path / "in")
    missing = tmp_path / "gone.png"
    paths = [files["a"], files["corrupt"], files["b"], files["notes"], missing, files["c"], files["d"]]
    rows = predict_files(model, {"image_size": SIZE}, paths, batch_size=batch_size, threshold=0.5)
    assert [row.path for row in rows] == [str(p) for p in paths], "one row per input, in order"
    by_path = {Path(row.path): row for row in rows}
    for key in ("a", "b", "c", "d"):
        row = by_path[files[key]]
        assert row.error is None, f"{key} should be scored, got error {row.error}"
        assert row.p_ai == pytest.approx(expected_p_ai(model, files[key]), abs=1e-5), f"{key}: wrong p_ai"
        assert row.label == ("ai" if row.p_ai >= 0.5 else "real"), f"{key}: label does not follow p_ai"
    for bad in (files["corrupt"], files["notes"]):
        row = by_path[bad]
        assert row.p_ai is None and row.label is None, f"{bad.name} must not get a score"
        assert row.error and "unreadable image" in row.error, f"{bad.name}: unclear error {row.error!r}"
    assert by_path[missing].error == "file not found", by_path[missing]


def test_predict_files_writes_cam_overlays(tmp_path: Path, model: models.Classifier) -> None:
    files = make_folder(tmp_path / "in")
    out = tmp_path / "cams"
    rows = predict_files(model, {"image_size": SIZE}, [tmp_path / "in"], batch_size=2, cam_dir=out)
    scored = [row for row in rows if row.error is None]
    assert len(scored) == 4 and len(rows) == 5, f"expected 4 scored and the corrupt jpg: {rows}"
    for row in scored:
        assert row.cam == str(out / cam_file_name(Path(row.path))), f"cam path of {row.path} wrong: {row.cam}"
        with Image.open(row.cam) as picture:
            assert picture.format == "PNG" and picture.size == (SIZE, SIZE), f"bad overlay {row.cam}"
            overlay = np.asarray(picture.convert("RGB"))
        original = decode_image(Path(row.path), SIZE).transpose(1, 2, 0)
        assert not np.array_equal(overlay, original), "the overlay must blend the CAM over the image"
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r.cam).name for r in scored), "stray files in OUT_DIR"
    assert next(r for r in rows if r.error).cam is None, "an unreadable file has no overlay"
    assert files["corrupt"].exists(), "input files must be left alone"


def test_same_stem_in_two_folders_gets_two_overlay_files(tmp_path: Path) -> None:
    one, two = tmp_path / "x" / "img.png", tmp_path / "y" / "img.png"
    assert cam_file_name(one) != cam_file_name(two), "overlays of same-named files would overwrite each other"
    assert cam_file_name(tmp_path / "we ird<>name.jpg").startswith("we_ird_name-"), "unsafe characters kept"


def test_predict_files_rejects_bad_arguments(tmp_path: Path, model: models.Classifier) -> None:
    path = make_image(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="image_size"):
        predict_files(model, {}, [path])
    with pytest.raises(ValueError, match="batch_size"):
        predict_files(model, {"image_size": SIZE}, [path], batch_size=0)
    with pytest.raises(ValueError, match="cam_method"):
        predict_files(model, {"image_size": SIZE}, [path], cam_dir=tmp_path / "c", cam_method="nope")
    assert predict_files(model, {"image_size": SIZE}, []) == [], "no files, no rows"
    row = PredictionRow("p", 0.25, "real", None)
    assert row.as_dict() == {"path": "p", "p_ai": 0.25, "label": "real", "error": None, "cam": None}
