"""Tests for pipeline_lib.learn.preprocess: the resized uint8 tensor cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline_lib.core import catalog as cat
from pipeline_lib.core.code_index import producer_code
from pipeline_lib.core.config import NormalizeConfig
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.learn import preprocess
from tests.conftest import make_image
from tests.project_copy import copy_project, digest_in, edit


def _store_image(workspace: Workspace, image: Image.Image, fmt: str = "PNG", **save: object) -> tuple[str, str]:
    """Save image into the store; return (sha256, relative path)."""
    path = workspace.root / "tmp-image"
    image.save(path, fmt, **save)
    sha, target = put_in_store(workspace, path.read_bytes(), fmt.lower())
    path.unlink()
    return sha, workspace.relative(target)


def _catalog(entries: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """Catalog rows from (sha256, path, status, split)."""
    return cat.new_rows(
        {"sha256": sha, "path": path, "label": "real", "group": "g", "status": status, "split": split}
        for sha, path, status, split in entries
    )


def _half_image(size: tuple[int, int]) -> Image.Image:
    """Left half black, right half white."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, size[0] // 2 :] = 255
    return Image.fromarray(array)


def test_tensor_path_layout(workspace: Workspace) -> None:
    sha = "ab" + "0" * 62
    folder = f"s32-{producer_code(preprocess.decode_image)}"
    assert preprocess.tensor_path(workspace, sha, 32) == workspace.cache / "tensors" / folder / "ab" / f"{sha}.npy"
    with pytest.raises(ValueError, match="sha256"):
        preprocess.tensor_path(workspace, "../etc", 32)
    with pytest.raises(ValueError, match="size"):
        preprocess.tensor_path(workspace, sha, 0)


def test_the_tensor_folder_is_named_by_the_decoding_code(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    before = digest_in(root, *preprocess.TENSOR_PRODUCERS)
    assert preprocess.cache_folder_name(8).endswith(f"-{before[:16]}"), "the copy holds the checkout's code"
    module = "pipeline_lib/learn/preprocess.py"
    edit(root, module, "def load_tensors(", "def load_tensors_renamed(")  # reads the cache, makes no tensor
    edit(root, module, "def _resize_crop(image: Image.Image, size: int)", "def _resize_crop(image, size: float)")
    assert digest_in(root, *preprocess.TENSOR_PRODUCERS) == before, "code that makes no tensor, an annotation"
    edit(root, module, "(new_w, new_h), Image.Resampling.BILINEAR", "(new_w, new_h), Image.Resampling.NEAREST")
    assert digest_in(root, *preprocess.TENSOR_PRODUCERS) != before, "a change of _resize_crop must decode again"


def test_decode_shape_dtype_and_centre_crop(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 20:40] = 200  # the centre third is bright: the crop keeps it
    Image.fromarray(array).save(path)
    tensor = preprocess.decode_image(path, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == np.uint8
    assert tensor[:, :, 2:14].min() >= 190


def test_decode_large_jpeg_and_modes(tmp_path: Path) -> None:
    big = make_image(tmp_path / "big.jpg", seed=1, size=(800, 600))
    assert preprocess.decode_image(big, 32).shape == (3, 32, 32)
    grey = tmp_path / "grey.png"
    Image.new("L", (40, 40), 77).save(grey)
    assert np.all(preprocess.decode_image(grey, 8) == 77)
    transparent = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(transparent)
    assert np.all(preprocess.decode_image(transparent, 8) == 255)  # alpha composited onto white


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[274] = 6  # stored sideways: must be rotated 90 degrees clockwise on display
    _half_image((40, 20)).save(path, "JPEG", quality=95, exif=exif.tobytes())
    tensor = preprocess.decode_image(path, 16).astype(int)
    # 40x20 (dark left, bright right) rotated clockwise -> 20x40 with dark top, bright bottom.
    assert tensor[:, :6].mean() < 60 and tensor[:, 10:].mean() > 200
    assert abs(tensor[:, :, :8].mean() - tensor[:, :, 8:].mean()) < 30


def test_preprocess_images_writes_once(workspace: Workspace, tmp_path: Path) -> None:
    ok = [_store_image(workspace, Image.open(make_image(tmp_path / f"{i}.png", seed=i, fmt="PNG"))) for i in range(3)]
    skipped = _store_image(workspace, _half_image((40, 40)))
    table = _catalog(
        [
            (*ok[0], "ok", "train"),
            (*ok[0], "ok", "train"),  # same sha twice: one tensor
            (*ok[1], "ok", "val"),
            (*ok[2], "ok", "test"),
            (*skipped, "rejected", "train"),
            (ok[1][0], ok[1][1], "ok", ""),
        ]
    )
    assert preprocess.preprocess_images(workspace, table, 24) == 3
    assert preprocess.preprocess_images(workspace, table, 24) == 0  # cache reused
    assert not preprocess.tensor_path(workspace, skipped[0], 24).exists()
    stored = np.load(preprocess.tensor_path(workspace, ok[0][0], 24))
    assert stored.shape == (3, 24, 24) and stored.dtype == np.uint8
    files = list((workspace.cache / "tensors").rglob("*"))
    assert not [f for f in files if f.name.endswith(".part")]
    assert preprocess.preprocess_images(workspace, table, 16) == 3  # another size is another cache


def test_preprocess_images_reports_bad_files(workspace: Workspace) -> None:
    sha, relative = put_in_store(workspace, b"definitely not an image", "jpg")
    table = _catalog([(sha, workspace.relative(relative), "ok", "train")])
    with pytest.raises(preprocess.PreprocessError, match=sha):
        preprocess.preprocess_images(workspace, table, 16)
    assert not preprocess.tensor_path(workspace, sha, 16).exists()
    missing = _catalog([("cd" + "1" * 62, "store/cd/gone.png", "ok", "val")])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        preprocess.preprocess_images(workspace, missing, 16)


def test_chunked_tensor_jobs_match_preprocess_images(workspace: Workspace, tmp_path: Path) -> None:
    ok = [_store_image(workspace, Image.open(make_image(tmp_path / f"{i}.png", seed=i, fmt="PNG"))) for i in range(4)]
    table = _catalog([(*entry, "ok", "train") for entry in ok] + [(*ok[0], "ok", "train")])
    jobs = preprocess.missing_tensor_jobs(workspace, table, 24)
    assert sorted(jobs) == sorted(ok)  # one job per distinct sha
    results = [preprocess.write_tensors(workspace, jobs[:2], 24), preprocess.write_tensors(workspace, jobs[2:], 24)]
    assert results == [(2, []), (2, [])]
    assert preprocess.missing_tensor_jobs(workspace, table, 24) == []
    assert preprocess.merge_tensor_results(workspace, table, 24, None, results) == 4
    for sha, relative in ok:
        expected = preprocess.decode_image(workspace.root / relative, 24)
        np.testing.assert_array_equal(np.load(preprocess.tensor_path(workspace, sha, 24)), expected)
    assert preprocess.write_tensors(workspace, jobs, 24) == (0, [])  # cached tensors are not written again
    preprocess.tensor_path(workspace, ok[0][0], 24).unlink()  # lost after the plan: the merge decodes it
    assert preprocess.merge_tensor_results(workspace, table, 24, None, []) == 1


def test_chunk_errors_are_returned_then_raised_by_the_merge(workspace: Workspace) -> None:
    sha, relative = put_in_store(workspace, b"definitely not an image", "jpg")
    table = _catalog([(sha, workspace.relative(relative), "ok", "train")])
    written, errors = preprocess.write_tensors(workspace, preprocess.missing_tensor_jobs(workspace, table, 16), 16)
    assert written == 0 and len(errors) == 1 and sha in errors[0]
    with pytest.raises(preprocess.PreprocessError, match=sha):
        preprocess.merge_tensor_results(workspace, table, 16, None, [(written, errors)])
    assert not preprocess.tensor_path(workspace, sha, 16).exists()


def test_preprocess_images_with_process_pool(workspace: Workspace, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(preprocess, "POOL_THRESHOLD", 2)
    stored = [
        _store_image(workspace, Image.open(make_image(tmp_path / f"{i}.png", seed=i, fmt="PNG"))) for i in range(4)
    ]
    table = _catalog([(*entry, "ok", "train") for entry in stored])
    assert preprocess.preprocess_images(workspace, table, 8, workers=2) == 4
    for sha, relative in stored:
        expected = preprocess.decode_image(workspace.root / relative, 8)
        assert np.array_equal(np.load(preprocess.tensor_path(workspace, sha, 8)), expected)


def test_load_tensors_order_and_on_the_fly(workspace: Workspace, tmp_path: Path) -> None:
    stored = [_store_image(workspace, Image.new("RGB", (30, 30), (v, v, v))) for v in (10, 120, 240)]
    table = _catalog([(*stored[0], "ok", "train")])
    preprocess.preprocess_images(workspace, table, 8)
    order = [stored[2][0], stored[0][0], stored[1][0]]  # two of three decoded on the fly
    images = preprocess.load_tensors(workspace, order, 8)
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
    assert images.shape == (3, 3, 8, 8)
    assert [int(images[i].float().mean()) for i in range(3)] == [240, 10, 120]
    assert preprocess.tensor_path(workspace, stored[2][0], 8).exists()
    assert preprocess.load_tensors(workspace, [], 8).shape == (0, 3, 8, 8)


def test_load_tensors_repairs_damaged_cache(workspace: Workspace) -> None:
    sha, _ = _store_image(workspace, Image.new("RGB", (30, 30), (50, 60, 70)))
    target = preprocess.tensor_path(workspace, sha, 8)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"broken")
    images = preprocess.load_tensors(workspace, [sha], 8)
    assert images[0, :, 0, 0].tolist() == [50, 60, 70]
    assert np.load(target).shape == (3, 8, 8)


def test_load_tensors_unknown_sha(workspace: Workspace) -> None:
    with pytest.raises(FileNotFoundError, match="ef" + "2" * 62):
        preprocess.load_tensors(workspace, ["ef" + "2" * 62], 8)


def _noisy(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_normalised_cache_path_and_pixels_differ_from_none(workspace: Workspace) -> None:
    policy = NormalizeConfig(mode="jpeg", quality=40)
    sha, relative = _store_image(workspace, _noisy(1))
    table = _catalog([(sha, relative, "ok", "train")])
    plain_path = preprocess.tensor_path(workspace, sha, 16)
    assert preprocess.tensor_path(workspace, sha, 16, NormalizeConfig()) == plain_path, "mode none: same paths"
    normalised_path = preprocess.tensor_path(workspace, sha, 16, policy)
    folder = f"s16-jpeg-q40-{producer_code(preprocess.decode_image)}"
    assert normalised_path == workspace.cache / "tensors" / folder / sha[:2] / f"{sha}.npy"
    assert preprocess.preprocess_images(workspace, table, 16) == 1
    assert preprocess.preprocess_images(workspace, table, 16, policy=policy) == 1, "another policy, another cache"
    assert preprocess.preprocess_images(workspace, table, 16, policy=policy) == 0, "normalised cache reused"
    plain, normalised = np.load(plain_path), np.load(normalised_path)
    assert plain.shape == normalised.shape == (3, 16, 16)
    assert not np.array_equal(plain, normalised), "JPEG q40 re-encoding must change the pixels"
    loaded = preprocess.load_tensors(workspace, [sha], 16, policy)
    assert torch.equal(loaded[0], torch.from_numpy(normalised)), "load_tensors must read the policy's cache"
    assert torch.equal(preprocess.load_tensors(workspace, [sha], 16)[0], torch.from_numpy(plain))
    # Decoding on the fly (no cache) gives the same pixels as the cache.
    normalised_path.unlink()
    assert np.array_equal(preprocess.load_tensor(workspace, sha, 16, policy), normalised)


def test_audit_features_of_normalised_files_lose_the_format_shortcut(workspace: Workspace) -> None:
    rows = []
    for i in range(6):
        sha, relative = _store_image(workspace, _noisy(i, (64, 48)), "PNG")
        rows.append((sha, relative, "ok", "train"))
        sha, relative = _store_image(workspace, _noisy(10 + i, (50, 40)), "JPEG", quality=95)
        rows.append((sha, relative, "ok", "train"))
    table = _catalog(rows)
    raw = preprocess.audit_features(workspace, table)
    assert set(raw["format_png"]) == {0.0, 1.0}, "stored files keep their formats"
    policy = NormalizeConfig(mode="jpeg", quality=80, resize_shorter=32, crop_square=True)
    normalised = preprocess.audit_features(workspace, table, policy)
    assert (normalised["format_jpeg"] == 1.0).all() and (normalised["width"] == 32).all()
    assert (normalised["height"] == 32).all() and (normalised["jpeg_quality"] == 80).all()
    assert list(normalised.index) == list(raw.index)


def test_decode_workers_import_no_torch() -> None:
    """The spawn pool's workers import this module; torch would add seconds to each worker's start."""
    code = "import sys, pipeline_lib.learn.preprocess, pipeline_lib.learn.normalize; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_robustness_pass_degrades_the_file_then_preprocesses_like_training(workspace: Workspace) -> None:
    import io

    from pipeline_lib.learn.normalize import degrade_file, jpeg_roundtrip

    noise = np.random.default_rng(7).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    sha, relative = _store_image(workspace, Image.fromarray(noise), "JPEG", quality=95)
    original = (workspace.root / relative).read_bytes()
    degraded_file = degrade_file(original, "jpeg75")
    assert degraded_file != original, "quality 75 must re-encode the file"
    with Image.open(io.BytesIO(degraded_file)) as image:
        assert image.size == (200, 150), "the whole file is re-encoded, not the 32 px model input"
    tensors = preprocess.degraded_tensors(workspace, [sha], 32, "jpeg75")
    assert tensors.shape == (1, 3, 32, 32) and tensors.dtype == torch.uint8
    assert np.array_equal(tensors[0].numpy(), preprocess.decode_image(io.BytesIO(degraded_file), 32))
    clean = preprocess.load_tensor(workspace, sha, 32)
    on_tensor, _ = jpeg_roundtrip(Image.fromarray(clean.transpose(1, 2, 0)), 75)
    assert not np.array_equal(tensors[0].numpy(), np.asarray(on_tensor).transpose(2, 0, 1)), "the tensor was degraded"
    policy = NormalizeConfig(mode="jpeg", quality_min=60, quality_max=90)
    normalised = preprocess.degraded_tensors(workspace, [sha], 32, "jpeg75", policy)
    expected = preprocess.decode_image(io.BytesIO(degraded_file), 32, policy, sha)  # training's quality for this sha
    assert np.array_equal(normalised[0].numpy(), expected)
    assert preprocess.degraded_tensors(workspace, [], 32, "jpeg75").shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="needs its sha256"):
        preprocess.decode_image(io.BytesIO(degraded_file), 32, policy)
