"""Tests for pipeline_lib.assess.predict: per-file p_ai and label, folders, batches, per-file errors, CAM overlays."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_lib.assess.evaluate import predict_probabilities
from pipeline_lib.assess.predict import (
    ModelCalibration,
    PredictionRow,
    calibration_path,
    cam_file_name,
    collect_paths,
    predict_files,
    read_calibration,
    write_calibration,
)
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.learn import models
from pipeline_lib.learn.preprocess import decode_image
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


def test_cam_overlays_explain_the_predicted_label_by_default(tmp_path: Path, model: models.Classifier) -> None:
    make_folder(tmp_path / "in")
    overlays = {}
    for target in ("predicted", "ai", "real"):
        cams = tmp_path / target  # 96 px: layer4 maps 3x3 (at 32 px they are 1x1 and every CAM is flat)
        rows = predict_files(model, {"image_size": 96}, [tmp_path / "in"], cam_dir=cams, cam_target=target)
        overlays[target] = {Path(r.path).name: (r.label, Path(r.cam).read_bytes()) for r in rows if r.error is None}
    assert any(overlays["ai"][name][1] != overlays["real"][name][1] for name in overlays["ai"]), "target ignored"
    for name, (label, picture) in overlays["predicted"].items():
        assert picture == overlays[label][name][1], f"{name} (predicted {label}) explains another class"
    with pytest.raises(ValueError, match="cam_target"):
        predict_files(model, {"image_size": SIZE}, [tmp_path / "in"], cam_dir=tmp_path / "c", cam_target="fake")


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
    expected = {"path": "p", "p_ai": 0.25, "label": "real", "error": None, "cam": None}
    assert row.as_dict() == expected | {"verdict": None, "p_ai_raw": None}
    with pytest.raises(ValueError, match="uncertain band"):
        predict_files(model, {"image_size": SIZE}, [path], band=(0.7, 0.3))


def test_verdict_follows_the_uncertain_band(tmp_path: Path, model: models.Classifier) -> None:
    files = make_folder(tmp_path / "in")
    paths = [files[k] for k in ("a", "b", "c", "d")]
    rows = predict_files(model, {"image_size": SIZE}, paths, band=(0.35, 0.65))
    for row in rows:
        expected = "ai" if row.p_ai >= 0.65 else "real" if row.p_ai <= 0.35 else "uncertain"
        assert row.verdict == expected, f"{row.path}: p_ai {row.p_ai} gave verdict {row.verdict}"
        assert row.p_ai_raw == pytest.approx(row.p_ai), "without calibration p_ai is the raw softmax"
    # A band around every score: all uncertain; a band below every score: all ai.
    low, high = min(r.p_ai for r in rows), max(r.p_ai for r in rows)
    wide = predict_files(model, {"image_size": SIZE}, paths, band=(low / 2, (1 + high) / 2))
    assert {r.verdict for r in wide} == {"uncertain"}, [r.verdict for r in wide]
    narrow = predict_files(model, {"image_size": SIZE}, paths, band=(low / 3, low / 2))
    assert {r.verdict for r in narrow} == {"ai"}, [r.verdict for r in narrow]


def test_calibration_file_round_trip_and_temperature_applied(tmp_path: Path, model: models.Classifier) -> None:
    checkpoint = tmp_path / "best.pt"
    assert calibration_path(checkpoint) == tmp_path / "best.calibration.json"
    assert read_calibration(checkpoint) == ModelCalibration(), "no file: T = 1, no normalisation"
    written = write_calibration(checkpoint, ModelCalibration(4.0, None, {"ece": 0.1}))
    loaded = read_calibration(checkpoint)
    assert written.is_file() and loaded.temperature == 4.0 and loaded.details == {"ece": 0.1}
    image = make_image(tmp_path / "a.png", seed=5, fmt="PNG")
    plain = predict_files(model, {"image_size": SIZE}, [image])[0]
    hot = predict_files(model, {"image_size": SIZE}, [image], calibration=loaded)[0]
    margin = np.log(plain.p_ai / (1 - plain.p_ai))
    assert hot.p_ai_raw == pytest.approx(plain.p_ai, abs=1e-9), "p_ai_raw is the uncalibrated score"
    assert hot.p_ai == pytest.approx(1 / (1 + np.exp(-margin / 4.0)), abs=1e-6), "p_ai must be sigmoid(margin / T)"
    assert abs(hot.p_ai - 0.5) <= abs(plain.p_ai - 0.5), "T > 1 must pull p_ai towards 0.5"
    # The policy of training travels with the file and changes the decoded pixels.
    policy = NormalizeConfig(mode="jpeg", quality=30)
    write_calibration(checkpoint, ModelCalibration(1.0, policy))
    assert read_calibration(checkpoint).normalize == policy
    normalised = predict_files(model, {"image_size": SIZE}, [image], calibration=read_calibration(checkpoint))[0]
    assert normalised.p_ai != pytest.approx(plain.p_ai, abs=1e-9), "the JPEG policy must change what the model sees"
    calibration_path(checkpoint).write_text('{"temperature": -1}', encoding="utf-8")
    with pytest.raises(ValueError, match="calibration.json"):
        read_calibration(checkpoint)
    for extreme in ("1e-12", "1e12"):  # each makes every p_ai 0/1 or 0.5: refused as a fitted one would be
        calibration_path(checkpoint).write_text(f'{{"temperature": {extreme}}}', encoding="utf-8")
        shown = re.escape(f"best.calibration.json: temperature T={float(extreme):.3g} is outside 0.2..10")
        with pytest.raises(ValueError, match=shown):
            read_calibration(checkpoint)
    with pytest.raises(ValueError, match="outside 0.2..10"):
        write_calibration(checkpoint, ModelCalibration(50.0))
    calibration_path(checkpoint).write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed"):
        read_calibration(checkpoint)


def _png_header_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a decompression bomb as far as any decoder knows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_files_ingest_would_refuse_are_reported_per_file_and_never_decoded(
    tmp_path: Path, model: models.Classifier
) -> None:
    from pipeline_lib.core.config import IngestConfig

    bomb = _png_header_claiming(tmp_path / "bomb.png", 12_000, 12_000)  # 144 megapixels
    tiny = make_image(tmp_path / "tiny.jpg", seed=5, size=(20, 20))
    good = make_image(tmp_path / "good.jpg", seed=6)
    rows = predict_files(model, {"image_size": SIZE}, [bomb, tiny, good], ingest=IngestConfig())
    by_name = {Path(row.path).name: row for row in rows}
    assert by_name["bomb.png"].p_ai is None
    assert "refused by the ingest policy: decompression_bomb" in by_name["bomb.png"].error
    assert "ingest.max_pixels=89478485" in by_name["bomb.png"].error
    assert by_name["tiny.jpg"].error.startswith("refused by the ingest policy: too_small")
    assert by_name["good.jpg"].error is None and 0 <= by_name["good.jpg"].p_ai <= 1
    strict = predict_files(model, {"image_size": SIZE}, [good], ingest=IngestConfig(max_pixels=100))
    assert "decompression_bomb" in strict[0].error


def test_predict_explains_a_vit_probe_on_its_patch_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_lib.learn import heads
    from tests.tiny_backbones import CLIP_SIZE, use_tiny_backbones

    use_tiny_backbones(monkeypatch)
    torch.manual_seed(0)
    probe, _ = models.build_model("clip_vit_b16", "none", head=heads.probe_spec("mlp", 8, 0.0))
    path = tmp_path / "probe.pt"
    models.save_checkpoint(path, probe, {"image_size": CLIP_SIZE})
    model, meta = models.load_model(path)
    files = make_folder(tmp_path / "in")
    rows = predict_files(model, meta, [tmp_path / "in"], batch_size=3, cam_dir=tmp_path / "cams")
    scored = [row for row in rows if row.error is None]
    assert len(scored) == 4 and all(row.p_ai is not None and 0 <= row.p_ai <= 1 for row in scored)
    for row in scored:
        with Image.open(row.cam) as picture:
            assert picture.size == (CLIP_SIZE, CLIP_SIZE), f"overlay of {row.path} is {picture.size}"
    expected = float(predict_probabilities(model, torch.from_numpy(decode_image(files["a"], CLIP_SIZE)[None]))[0])
    assert next(r for r in rows if r.path == str(files["a"])).p_ai == pytest.approx(expected, abs=1e-6)
