"""The champion policy and registered models rebuilt from their state_dict: real MLflow on SQLite in tmp_path."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline_lib.assess import evaluate
from pipeline_lib.assess.predict import ModelCalibration
from pipeline_lib.assess.registry import (
    Challenger,
    alias_for,
    load_champion,
    load_run_model,
    register_challenger,
    register_model,
)
from pipeline_lib.core.tracking.logged_models import ModelNotFoundError, UnsafeModelError, log_pytorch_model
from pipeline_lib.core.tracking.runs import CATALOG_ARTIFACTS, run_summary, start_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.versions import champion_calibration, current_champion, find_version
from pipeline_lib.core.workspace import bytes_sha256
from pipeline_lib.learn import models, preprocess
from tests.conftest import MarkerPayload, make_image

SIZE = 32  # image size of the test checkpoints


def _tracker(workspace):
    uri = tracking_uri(None, workspace)
    return start_run(uri, "exp", workspace, "run", {"aidetect.kind": "pipeline"})


def test_champion_moves_only_on_improvement(workspace):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    example = np.random.rand(1, 3, 4, 4).astype("float32")
    decisions = []
    for score in (0.8, 0.7, 0.9):
        tracker = _tracker(workspace)
        uri = log_pytorch_model(tracker, model, example, ["torch"])
        decisions.append(register_model(tracker, uri, "det", score, "testdigest", f"m{score}"))
    assert [d.promoted for d in decisions] == [True, False, True], [d.reason for d in decisions]
    champion = current_champion(tracker.uri, "det")
    assert str(champion.version) == decisions[2].version
    assert str(find_version(tracker.uri, "det", "m0.7").version) == decisions[1].version
    # A champion scored on another test split is not compared blindly.
    other = register_model(tracker, uri, "det", 0.99, "othertest", "m-other")
    assert not other.promoted and not other.comparable and "another test split" in other.not_comparable, other


def test_load_champion_and_run_model_round_trip_with_image_size(workspace):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    tracker = _tracker(workspace)
    uri = log_pytorch_model(tracker, model, np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])
    with pytest.raises(ModelNotFoundError, match="no 'champion'"):
        load_champion(tracker.uri, "det")
    register_model(tracker, uri, "det", 0.5, "t", "m", image_size=4)
    with pytest.raises(UnsafeModelError, match="--trust-pickle"):
        load_champion(tracker.uri, "det")  # logged without a state_dict: only unpickling could load it
    champion, size = load_champion(tracker.uri, "det", trust_pickle=True)
    assert size == 4, f"champion image size should come from its version tag, got {size}"
    images = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(champion(images), model(images), msg="the loaded champion is not the logged model")
    with pytest.raises(UnsafeModelError):
        load_run_model(tracker.uri, tracker.run_id)
    by_run, run_size = load_run_model(tracker.uri, tracker.run_id, trust_pickle=True)
    assert run_size == 4, f"a run's model image size should come from its signature, got {run_size}"
    torch.testing.assert_close(by_run(images), model(images))
    with pytest.raises(ModelNotFoundError, match="no MLflow run"):
        load_run_model(tracker.uri, "0" * 32)
    empty = _tracker(workspace)
    with pytest.raises(ModelNotFoundError, match="logged no model"):
        load_run_model(tracker.uri, empty.run_id)


def _constant_model(workspace, name: str, real_bias: float, ai_bias: float):
    """A resnet18 checkpoint whose head ignores the image: always ai or always real."""
    model, _ = models.build_model("resnet18", "none")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([real_bias, ai_bias]))
    path = workspace.models / f"{name}.pt"
    models.save_checkpoint(path, model, {"image_size": SIZE})
    return workspace.ref(path)


def _test_split(workspace, name: str, labels: list[str], seed: int):
    """Stored images with these labels: the test rows of a split and a Ref to their table."""
    shas = []
    for index, _ in enumerate(labels):
        image = make_image(workspace.root / "tmp.png", seed=seed * 100 + index, size=(40, 40), fmt="PNG")
        data = image.read_bytes()
        sha = bytes_sha256(data)
        target = workspace.store_path(sha, "png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        shas.append(sha)
    rows = pd.DataFrame(
        {
            "sha256": shas,
            "group": [f"g{i}" for i in range(len(labels))],
            "label": labels,
            "source": "folder",
            "url": "",
            "keyword": "",
        }
    )
    path = workspace.reports / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)
    return rows, workspace.ref(path)


def _register(workspace, model_ref, split, digest, threshold=0.5, calibration=None, catalog=None, promote=False):
    """Evaluate model_ref on the split like the evaluate stage does, at a threshold, then register it as the register
    task does (with --promote when promote); the run first logs `catalog` (its training data), if given, as the
    pipeline does."""
    rows, rows_ref = split
    model, meta = models.load_model(model_ref.resolve(workspace))
    images = preprocess.load_tensors(workspace, rows["sha256"].tolist(), int(meta["image_size"]))
    predictions = evaluate.predictions_table(rows, evaluate.predict_probabilities(model, images), threshold)
    predictions.to_parquet(rows_ref.resolve(workspace), index=False)
    metrics = evaluate.compute_metrics(predictions, threshold, n_bootstrap=0)
    temperature, normalize = calibration or (1.0, None)
    tracker = _tracker(workspace)
    if catalog is not None:
        path = workspace.reports / f"catalog-{digest}.parquet"
        catalog.to_parquet(path, index=False)
        tracker.log_artifact(path, CATALOG_ARTIFACTS)
    own = ModelCalibration(temperature, normalize)
    checkpoint, table = model_ref.resolve(workspace), rows_ref.resolve(workspace)
    challenger = Challenger(checkpoint, model_ref.digest, table, metrics, own, digest)
    result = register_challenger(workspace, tracker, challenger, "det", promote=promote)
    return result, run_summary(tracker.uri, tracker.run_id)


def test_the_champion_is_rescored_when_the_test_split_changed(workspace):
    always_ai = _constant_model(workspace, "ai1", 0.0, 5.0)
    always_real = _constant_model(workspace, "real1", 5.0, 0.0)
    split_a = _test_split(workspace, "a", ["ai", "ai", "ai", "real"], seed=1)  # always-ai: 0.75
    split_b = _test_split(workspace, "b", ["ai", "real", "real", "real"], seed=2)  # always-real: 0.75
    split_c = _test_split(workspace, "c", ["ai", "ai", "real", "real"], seed=3)  # both: 0.5

    first, _ = _register(workspace, always_ai, split_a, "A")
    assert first["promoted"] and first["reason"] == "no champion yet", first

    # Split B: the champion (always ai) scored 0.75 on A, re-scored on B it gets 0.25 and loses to 0.75.
    second, run = _register(workspace, always_real, split_b, "B")
    assert second["promoted"], f"a better challenger must win after re-scoring: {second}"
    assert second["champion_score"] == pytest.approx(0.25), f"champion re-scored on B should score 0.25: {second}"
    assert run["metrics"]["registry.champion_score"] == pytest.approx(0.25)
    assert run["metrics"]["registry.challenger_score"] == pytest.approx(0.75)
    assert run["tags"]["aidetect.champion_rescored"] == "true" and run["tags"]["aidetect.champion_promoted"] == "true"
    assert run["tags"]["aidetect.image_size"] == str(SIZE)

    # Split C: the champion (always real) re-scored gets 0.5, a tie with the challenger: it stays.
    third, run = _register(workspace, _constant_model(workspace, "ai2", 0.0, 6.0), split_c, "C")
    assert not third["promoted"] and third["champion_score"] == pytest.approx(0.5), third
    assert "<=" in run["tags"]["aidetect.champion_decision"], run["tags"]
    champion = current_champion(workspace_uri(workspace), "det")
    assert str(champion.version) == second["version"], "the champion moved without improving"
    assert champion.tags["test_digest"] == "C", "the re-scored champion must record the split it was scored on"

    # Same split C again: the champion's score on C is known, no second re-scoring.
    fourth, run = _register(workspace, _constant_model(workspace, "real2", 6.0, 0.0), split_c, "C")
    assert not fourth["promoted"] and fourth["champion_score"] == pytest.approx(0.5), fourth
    assert run["tags"]["aidetect.champion_rescored"] == "false", "the champion was re-scored on the split it knew"


def workspace_uri(workspace) -> str:
    return tracking_uri(None, workspace)


def test_champion_carries_its_calibration_for_predict(workspace):
    from pipeline_lib.assess.predict import parse_calibration
    from pipeline_lib.core.config import NormalizeConfig

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    tracker = _tracker(workspace)
    uri = log_pytorch_model(tracker, model, np.random.rand(1, 3, 4, 4).astype("float32"), ["torch"])
    text = json.dumps(ModelCalibration(0.5, NormalizeConfig(mode="jpeg", quality=80)).as_dict())
    register_model(tracker, uri, "cal", 0.9, "t", "m", image_size=4, calibration=text)
    found = parse_calibration(champion_calibration(tracker.uri, "cal"), "champion tag")
    assert found.temperature == 0.5 and found.normalize.quality == 80
    assert champion_calibration(tracker.uri, "no-such-model") is None
    with pytest.raises(ValueError, match="champion tag is malformed"):
        parse_calibration("{}", "champion tag")


def test_alias_of_a_leave_one_generator_out_run():
    assert alias_for(None) == alias_for("") == "champion"
    assert alias_for("Stable Diffusion 1.5") == "loo-stable-diffusion-1-5"
    assert alias_for("midjourney") == "loo-midjourney"


def _logged(workspace):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    tracker = _tracker(workspace)
    return tracker, log_pytorch_model(tracker, model, np.random.rand(1, 3, 4, 4).astype("float32"), ["t"])


def test_a_not_comparable_challenger_moves_the_alias_only_with_promote(workspace):
    tracker, uri = _logged(workspace)
    first = register_model(tracker, uri, "det", 0.6, "A", "m1")
    unfair = "not comparable: 2 of the 4 test images were in the training or validation data of version 1"
    kept = register_model(tracker, uri, "det", 0.9, "B", "m2", champion_score=0.95, not_comparable=unfair)
    assert not kept.promoted and not kept.comparable and "pass --promote" in kept.reason, kept
    champion = current_champion(tracker.uri, "det")
    assert str(champion.version) == first.version and champion.tags["test_digest"] == "A", "an unfair score was kept"
    forced = register_model(tracker, uri, "det", 0.5, "B", "m3", not_comparable=unfair, promote=True)
    assert forced.promoted and "promoted anyway (--promote)" in forced.reason, forced
    assert str(current_champion(tracker.uri, "det").version) == forced.version


def test_a_leave_one_generator_out_model_never_touches_the_champion(workspace):
    tracker, uri = _logged(workspace)
    champion = register_model(tracker, uri, "det", 0.6, "A", "m1")
    before = dict(current_champion(tracker.uri, "det").tags)
    loo = register_model(tracker, uri, "det", 0.99, "LOO", "m2", champion_score=0.1, alias="loo-mj")
    assert loo.promoted and loo.reason == "no loo-mj yet" and loo.alias == "loo-mj", loo
    again = register_model(tracker, uri, "det", 0.3, "LOO", "m3", champion_score=0.99, alias="loo-mj")
    assert not again.promoted and again.reason == "accuracy 0.3000 <= loo-mj 0.9900", again
    current = current_champion(tracker.uri, "det")
    assert str(current.version) == champion.version and dict(current.tags) == before
    assert str(current_champion(tracker.uri, "det", "loo-mj").version) == loo.version


def test_the_champion_is_rescored_with_its_own_temperature_and_normalisation(workspace):
    from pipeline_lib.core.config import NormalizeConfig
    from pipeline_lib.learn.normalize import policy_key

    # p_ai = sigmoid(0.85) = 0.70 for every image: "ai" at threshold 0.6, but its own T=4 makes it 0.55: "real"
    champion = _constant_model(workspace, "hot", 0.0, 0.85)
    own = (4.0, NormalizeConfig(mode="jpeg", quality=70))
    first, _ = _register(workspace, champion, _test_split(workspace, "a", ["real", "ai"], seed=1), "A", 0.6, own)
    assert first["promoted"], first
    split_b = _test_split(workspace, "b", ["real", "real", "real", "ai"], seed=2)
    second, run = _register(workspace, _constant_model(workspace, "ai3", 0.0, 5.0), split_b, "B", 0.6)
    assert second["champion_score"] == pytest.approx(0.75), "with T=1 the champion would say ai and score 0.25"
    assert not second["promoted"] and second["comparable"], second
    policy_folder = preprocess.tensor_folder(workspace, SIZE, own[1])
    assert policy_folder.name.startswith(f"s{SIZE}-{policy_key(own[1])}-")
    assert policy_folder.is_dir(), "the champion's images were not decoded with its own normalisation"


def test_a_champion_trained_on_the_test_images_is_reported_not_comparable(workspace):
    split_a = _test_split(workspace, "a", ["ai", "real"], seed=1)
    split_b = _test_split(workspace, "b", ["ai", "real", "real", "ai"], seed=2)
    trained_on = pd.DataFrame(
        {"sha256": [*split_a[0]["sha256"], split_b[0]["sha256"][0]], "status": "ok", "split": ["test", "train", "val"]}
    )
    always_real = _constant_model(workspace, "real9", 5.0, 0.0)
    first, _ = _register(workspace, always_real, split_a, "A", catalog=trained_on)
    better = _constant_model(workspace, "ai9", 0.0, 5.0)
    second, run = _register(workspace, better, split_b, "B")
    assert not second["comparable"] and not second["promoted"], second
    assert second["reason"].startswith("not comparable: 1 of the 4 test images were in the training or validation"), (
        second["reason"]
    )
    assert run["tags"]["aidetect.champion_comparable"] == "false"
    assert str(current_champion(workspace_uri(workspace), "det").version) == first["version"]


def test_promote_on_a_later_run_moves_the_alias_to_the_version_of_the_cached_model(workspace):
    split = _test_split(workspace, "a", ["ai", "ai", "ai", "real"], seed=1)
    first, _ = _register(workspace, _constant_model(workspace, "ai1", 0.0, 5.0), split, "A")  # always ai: 0.75
    weaker = _constant_model(workspace, "real1", 5.0, 0.0)  # always real: 0.25
    second, _ = _register(workspace, weaker, split, "A")
    assert not second["promoted"] and second["champion_version"] == first["version"], second
    # 3 images only the champion gets right, 1 only the challenger: exact p = 0.625
    assert second["mcnemar_p"] == pytest.approx(0.625) and second["mcnemar_verdict"] == "the difference could be noise"

    again, run = _register(workspace, weaker, split, "A")  # a next run finds the model cached: the same checkpoint
    assert again["reused"] and not again["promoted"] and again["version"] == second["version"], again
    assert again["champion_version"] == first["version"] and "pass --promote" in again["reason"], again
    assert str(current_champion(workspace_uri(workspace), "det").version) == first["version"]

    promoted, run = _register(workspace, weaker, split, "A", promote=True)
    assert promoted["reused"] and promoted["promoted"] and promoted["version"] == second["version"], promoted
    assert str(current_champion(workspace_uri(workspace), "det").version) == second["version"], "--promote ignored"
    assert run["tags"]["aidetect.champion_promoted"] == "true" and run["tags"]["aidetect.model_reused"] == "true"
    holds, _ = _register(workspace, weaker, split, "A", promote=True)
    assert holds["reused"] and not holds["promoted"] and holds["aliases"] == ["champion"], holds


# --------------------------------------------------------------------------------------------------------------
# Registered models are rebuilt from their state_dict: a replaced pickle in the tracking store runs nothing


def _logged_files(workspace, name: str) -> list:
    return sorted((workspace.root / "mlartifacts").rglob(name))


def test_the_champion_is_rebuilt_from_its_state_dict_and_a_pickled_payload_never_runs(workspace, tmp_path):
    model_ref = _constant_model(workspace, "champ", 0.0, 5.0)
    model, meta = models.load_model(model_ref.resolve(workspace))
    tracker = _tracker(workspace)
    example = np.random.rand(1, 3, SIZE, SIZE).astype("float32")
    uri = log_pytorch_model(tracker, model, example, ["torch"], checkpoint=model_ref.resolve(workspace))
    register_model(tracker, uri, "det", 0.5, "t", "m", image_size=SIZE, architecture=meta["model_name"])
    assert current_champion(tracker.uri, "det").tags["architecture"] == "resnet18"
    marker = tmp_path / "pwned"
    (pickled,) = _logged_files(workspace, "model.pth")
    torch.save(MarkerPayload(str(marker)), pickled)  # someone with write access to the store replaced it

    champion, size = load_champion(tracker.uri, "det")
    assert not marker.exists(), "loading the champion unpickled the model"
    assert size == SIZE and isinstance(champion, models.Classifier)
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(champion(images), model(images))

    (state,) = _logged_files(workspace, "best.pt")
    torch.save(MarkerPayload(str(marker)), state)
    with pytest.raises(UnsafeModelError, match="cannot be loaded safely"):
        load_champion(tracker.uri, "det")
    with pytest.raises(UnsafeModelError):
        load_champion(tracker.uri, "det", trust_pickle=True)
    assert not marker.exists(), "a state_dict file is never unpickled beyond tensors"


def test_a_champion_that_cannot_be_loaded_safely_is_reported_and_skipped(workspace, tmp_path):
    split = _test_split(workspace, "a", ["ai", "ai", "real", "real"], seed=1)
    first, _ = _register(workspace, _constant_model(workspace, "ai1", 0.0, 5.0), split, "A")
    marker = tmp_path / "pwned"
    for path in _logged_files(workspace, "model.pth") + _logged_files(workspace, "best.pt"):
        torch.save(MarkerPayload(str(marker)), path)
    second, run = _register(workspace, _constant_model(workspace, "real1", 5.0, 0.0), split, "A")
    assert not marker.exists(), "champion re-scoring unpickled the model"
    assert "cannot be loaded safely" in second["champion_skipped"], second
    assert "cannot be loaded safely" in run["tags"]["aidetect.champion_skipped"]
    assert second["version"] != first["version"]




def test_a_probe_champion_is_logged_as_head_and_backbone_file_and_rebuilt_from_it(workspace, tmp_path, monkeypatch):
    from pipeline_lib.learn import heads
    from tests.tiny_backbones import DINO_SIZE, safetensors_file, use_tiny_backbones

    use_tiny_backbones(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data, digest = safetensors_file(models.Classifier("dinov2_vits14").backbone.state_dict())
    stored = tmp_path / "torch" / "hub" / "checkpoints" / "vit_small_patch14_dinov2.lvd142m.safetensors"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(data)
    model, weights = models.build_model("dinov2_vits14", "pretrained", head=heads.probe_spec("linear", 1, 0.0))
    models.reference_backbone(model, weights)
    checkpoint = workspace.models / "probe.pt"
    models.save_checkpoint(checkpoint, model, {"image_size": DINO_SIZE})
    split = _test_split(workspace, "a", ["ai", "real", "ai", "real"], seed=3)
    result, run = _register(workspace, workspace.ref(checkpoint), split, "A")
    assert result["promoted"] and run["tags"]["aidetect.champion_alias"] == "champion"
    (pickled,) = _logged_files(workspace, "model.pth")
    assert pickled.stat().st_size < 100_000, "the logged model holds the head, not the backbone"
    (requirements,) = _logged_files(workspace, "requirements.txt")
    assert "timm==" in requirements.read_text(), "a DINOv2 model needs timm to be loaded"
    champion, size = load_champion(workspace_uri(workspace), "det")
    assert size == DINO_SIZE and models.is_probe(champion)
    images = torch.rand(2, 3, DINO_SIZE, DINO_SIZE)
    torch.testing.assert_close(champion(images), model.eval()(images))
    assert champion.backbone_reference == {"file": stored.name, "sha256": digest}
