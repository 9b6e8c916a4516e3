"""Tests for pipeline_lib.assess.review_queue: the signals, their combination and the queue on planted data."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression
from torch import nn

from pipeline_lib.assess import review_queue as rq
from pipeline_lib.assess.review_scorer import Scorer
from pipeline_lib.core.catalog import new_rows
from pipeline_lib.core.workspace import Workspace, put_in_store
from pipeline_lib.curate import review
from pipeline_lib.learn import features
from pipeline_lib.ops.demo_faces import class_files

SIZE = 32
NO_FACES = rq.QueueSettings(tiny_side=16, count_faces=False)


def test_signals_combine_as_independent_chances() -> None:
    assert rq.combine([]) == 0.0
    assert rq.combine([rq.Signal(0.5, "a"), rq.Signal(0.5, "b")]) == pytest.approx(0.75)
    assert rq.combine([rq.Signal(0.0, "information")]) == 0.0
    assert rq.combine([rq.Signal(1.5, "clipped")]) == 1.0


def test_label_signals_say_what_the_model_thinks_and_cleanlab_flags_issues() -> None:
    labels = ["real"] * 12 + ["ai"] * 12
    p_ai = np.array([0.05] * 11 + [0.93] + [0.95] * 11 + [0.2])
    signals = rq.label_signals(labels, p_ai)
    assert signals[11].text == "model says ai with 0.93 (cleanlab: label issue)", signals[11]
    assert signals[11].strength == pytest.approx(0.93) and signals[11].reject_reason == "wrong_label"
    assert signals[23].text.startswith("model says real with 0.80")
    assert signals[0].text == "model agrees: real 0.95" and signals[0].strength == pytest.approx(0.05)
    few = rq.label_signals(["real", "ai"], np.array([0.4, 0.6]))
    assert [s.text for s in few] == ["model is unsure: real 0.60", "model is unsure: ai 0.60"], "too few for cleanlab"


def test_outliers_are_far_from_the_approved_images_of_their_label() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    reference = centre + rng.normal(scale=0.1, size=(60, 16))
    groups = [f"person{i // 3}" for i in range(60)]
    usual = centre + rng.normal(scale=0.1, size=(8, 16))
    odd = -centre + rng.normal(scale=0.1, size=(2, 16))
    signals = rq.outlier_signals([reference], groups, [np.vstack([usual, odd])], "real", neighbours=10)
    strengths = [s.strength if s else 0.0 for s in signals]
    assert min(strengths[8:]) > 0.9 > 0.4 > max(strengths[:8]), strengths
    assert signals.count(None) >= 3, "images closer than usual give no reason at all"
    assert signals[8].text == "outlier among real photos (beyond every approved one)", signals[8].text
    assert signals[8].reject_reason == "unrelated"
    # A second block where the odd ones look usual and one usual image is odd: the stronger block counts.
    second = [reference[:, :8], np.vstack([usual, odd])[:, :8]]
    shifted = second[1].copy()
    shifted[0] = -shifted[0]
    both = rq.outlier_signals([reference, second[0]], groups, [np.vstack([usual, odd]), shifted], "ai", 10)
    assert both[0].strength > 0.9 and min(s.strength for s in both[8:]) > 0.9, both


def _row(sha: str, group: str, cluster: str) -> pd.Series:
    return pd.Series({"sha256": sha, "group": group, "cluster": cluster})


def test_near_duplicates_of_rejected_images_or_other_groups_are_suspects_and_the_keeper_is_named() -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    members = pd.DataFrame({"sha256": [a, b, c], "group": ["g", "g", "h"], "cluster": [a, a, a]})
    rejected = {b: review.Decision(b, "reject", "unrelated", "me")}
    found = rq.duplicate_signal(_row(a, "g", a), members, rejected)
    assert found.strength == 0.9 and found.text == "near-duplicate of bbbbbbbb, rejected before (unrelated)"
    assert found.reject_reason == "unrelated"
    across = rq.duplicate_signal(_row(a, "g", a), members, {})
    assert across.text == "near-duplicate of cccccccc in group h" and across.strength == 0.5
    same_group = members[members["group"] == "g"]
    keeper = rq.duplicate_signal(_row(a, "g", a), same_group, {})
    assert keeper.strength == 0.0 and keeper.text == "keeper of a near-duplicate cluster (bbbbbbbb marked duplicate)"
    assert rq.duplicate_signal(_row(a, "g", a), members[members["sha256"] == a], {}) is None


def test_face_and_tiny_signals() -> None:
    assert rq.face_signal("no face found").strength == 0.25
    assert rq.face_signal("3 faces").reject_reason == "several_people"
    assert rq.face_signal("1 face").strength == 0.0
    assert rq.face_signal("face count unavailable") is None
    assert rq.tiny_signal(120, 90, 128).text == "tiny: 120x90"
    assert rq.tiny_signal(200, 150, 128) is None and rq.tiny_signal(pd.NA, 90, 128) is None


def test_a_suspect_row_suggests_rejecting_for_its_strongest_reason() -> None:
    row = pd.Series({"sha256": "a" * 64, "label": "real", "group": "g"})
    strong = rq.queue_row(row, [rq.Signal(0.25, "no face found", "unrelated"), rq.Signal(0.9, "model", "wrong_label")])
    assert strong["suggested"] == "reject" and strong["reject_reason"] == "wrong_label" and strong["why"] == "model"
    assert strong["reasons"] == ["model", "no face found"] and strong["suspicion"] == pytest.approx(0.925)
    weak = rq.queue_row(row, [rq.Signal(0.25, "no face found", "unrelated")])
    assert weak["suggested"] == "approve" and weak["reject_reason"] == ""
    assert weak["why"] == "suspicion 0.25, below 0.5 (strongest: no face found)"
    assert rq.queue_row(row, [])["why"] == "nothing against it"


# --- the queue on planted data ----------------------------------------------------------------------------------


def _page(seed: int) -> bytes:
    """An off-topic image: lines of dark marks on a white page (a screenshot of text)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (48, 48), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for y in range(4, 44, 6):
        draw.line((2, y, int(rng.integers(20, 46)), y), fill=(20, 20, 30), width=2)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def stored(workspace: Workspace, files: dict[str, bytes], label: str, prefix: str) -> list[dict[str, object]]:
    """Put files (<group>/<name> -> bytes) into the store; their catalog rows (group: prefix + folder)."""
    rows = []
    for name, data in sorted(files.items()):
        sha, path = put_in_store(workspace, data, "png" if data[:4] == b"\x89PNG" else "jpg")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        group = prefix + name.split("/")[0]
        rows.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": label,
                "status": "ok",
                "group": group,
                "width": width,
                "height": height,
            }
        )
    return rows


def _planted(workspace: Workspace) -> tuple[pd.DataFrame, set[str]]:
    """Approved demo faces of both classes, a crawl of new people, and planted errors: AI portraits in the real folder
    and pages of text in both folders."""
    rows = []
    for label in ("real", "ai"):
        rows += stored(workspace, class_files(1, 8, 48, label), label, "old-")
    review.append_decisions(workspace, [review.Decision(str(r["sha256"]), "approve", "", "t") for r in rows])
    for label in ("real", "ai"):
        rows += stored(workspace, class_files(2, 5, 48, label), label, "new-")
    wrong = dict(list(class_files(3, 2, 48, "ai").items())[:3])
    planted = stored(workspace, {f"person-01/x{i}": data for i, data in enumerate(wrong.values())}, "real", "new-")
    planted += stored(workspace, {"person-02/n1": _page(1)}, "real", "new-")
    planted += stored(workspace, {"prompt-01/n2": _page(2)}, "ai", "new-")
    return new_rows(rows + planted), {str(r["sha256"]) for r in planted}


class ImageStatistics(nn.Module):
    """A small fixed model: per image, high-frequency energy (photos carry sensor noise, generated portraits are
    smooth), then mean and spread of each colour."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float() / 255.0
        centre = x[..., 1:-1, 1:-1]
        laplace = 4 * centre - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
        energy = laplace.abs().mean(dim=(1, 2, 3))
        return torch.cat([torch.stack([energy, torch.ones_like(energy)], 1), x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def _statistics_input(path, sha256: str) -> np.ndarray:
    return features.classifier_input(path, sha256, SIZE, None)


def _statistics_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def _statistics_scorer(workspace: Workspace, catalog: pd.DataFrame, name: str = "stats/1") -> Scorer:
    """A champion made of ImageStatistics and a logistic regression fitted on the approved images' statistics."""
    extractor = features.Extractor(
        name=name,
        identity={"image_size": str(SIZE)},
        producers=(ImageStatistics, _statistics_input, _statistics_forward),
        model=ImageStatistics(),
        load=_statistics_input,
        forward=_statistics_forward,
        dim=8,
        blocks=((features.PENULTIMATE, 2), ("colour", 6)),
    )
    approved = catalog[catalog["sha256"].isin(review.read_decisions(workspace))]
    files = {sha: workspace.root / path for sha, path in zip(approved["sha256"], approved["path"], strict=True)}
    fitted = features.embed(workspace, extractor, files).matrix[:, :2]
    probe = LogisticRegression(C=10.0).fit(fitted, approved["label"] == "ai")
    return Scorer(name, extractor, lambda head: probe.predict_proba(head)[:, 1], frozenset(approved["sha256"]))


@pytest.fixture(scope="module")
def planted_queue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, pd.DataFrame, set[str], Scorer]:
    workspace = Workspace.create(tmp_path_factory.mktemp("planted") / "ws")
    catalog, planted = _planted(workspace)
    return workspace, catalog, planted, _statistics_scorer(workspace, catalog)


def test_the_queue_puts_planted_errors_first(planted_queue) -> None:
    workspace, catalog, planted, scorer = planted_queue
    queue = rq.build_queue(workspace, catalog, review.read_decisions(workspace), scorer, NO_FACES)
    order = list(queue.rows["sha256"])
    assert len(order) == len(catalog) - len(review.read_decisions(workspace)), "every undecided image, once"
    ranks = sorted(order.index(sha) for sha in planted)
    assert ranks[-1] <= len(planted), f"planted errors at ranks {ranks} of {len(order)}: {queue.rows.head(8)}"
    assert queue.scorer == "model:stats/1" and "champion" in queue.sources
    assert list(queue.rows["suspicion"]) == sorted(queue.rows["suspicion"], reverse=True)
    top = queue.rows.iloc[0]
    assert top["suggested"] == "reject" and top["why"] == top["reasons"][0]
    kinds = [
        reasons[0].split(" with")[0].split(" (")[0]
        for sha, reasons in queue.rows[["sha256", "reasons"]].values
        if sha in planted
    ]
    assert sorted(kinds) == ["model says ai"] * 3 + ["outlier among AI images", "outlier among real photos"], kinds


def test_embeddings_are_computed_only_for_new_images_or_a_new_model(planted_queue) -> None:
    workspace, catalog, _, scorer = planted_queue
    decisions = review.read_decisions(workspace)
    first = rq.build_queue(workspace, catalog, decisions, scorer, NO_FACES)
    again = rq.build_queue(workspace, catalog, decisions, scorer, NO_FACES)
    assert again.computed == 0 and again.reused == first.computed + first.reused, "a re-score embeds nothing"
    pd.testing.assert_frame_equal(again.rows, first.rows)
    extra = stored(workspace, {"person-03/late": _page(9)}, "real", "new-")
    grown = new_rows([*catalog.to_dict("records"), *extra])
    recrawl = rq.build_queue(workspace, grown, decisions, scorer, NO_FACES)
    assert recrawl.computed == 1, "a re-crawl embeds only its new image"
    other = dataclasses.replace(scorer, name="stats/2", extractor=dataclasses.replace(scorer.extractor, name="stats/2"))
    retrained = rq.build_queue(workspace, grown, decisions, other, NO_FACES)
    assert retrained.computed == recrawl.computed + recrawl.reused, "a new model embeds every image again"


def test_without_a_model_the_queue_uses_hints_and_says_why(planted_queue) -> None:
    workspace, catalog, _, _ = planted_queue
    queue = rq.build_queue(workspace, catalog, review.read_decisions(workspace), None, NO_FACES, "no model here")
    assert queue.scorer == "" and queue.note == "no model here" and queue.computed == 0
    assert set(queue.rows["suggested"]) == {"approve"} and queue.rows["suspicion"].max() == 0.0
    lines = rq.queue_lines(queue, 0.3)
    assert lines[0].startswith(f"{len(queue.rows)} image(s) to review, 0 at or above suspicion 0.3 (no model: no")
