"""Tests for pipeline_lib.assess.report: the HTML report folder (pictures, sections, escaping)."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline_lib.assess.evaluate import per_group_accuracy, predictions_table
from pipeline_lib.assess.plots import plot_roc
from pipeline_lib.assess.report import build_report
from pipeline_lib.assess.report_content import select_examples
from tests.assess.conftest import random_images
from tests.conftest import TinyClassifier

HOSTILE_GROUP = "<script>alert(1)</script>"
HOSTILE_URL = 'http://127.0.0.1/a.jpg?q="><img onerror=alert(2) src=x>'


class ImageTags(HTMLParser):
    """Collects the attributes of every <img> and the href of every <a>."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")


class Examples(HTMLParser):
    """The visible text of every <div class="example" data-sha256=...>, by sha256."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, str] = {}
        self.current: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "div" and values.get("class") == "example":
            self.current, self.depth = values.get("data-sha256") or "", 0
            self.found[self.current] = ""
        elif tag == "div" and self.current is not None:
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.current is not None:
            if self.depth == 0:
                self.current = None
            else:
                self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.found[self.current] += data


def make_predictions(groups: list[str] | None = None, urls: list[str] | None = None) -> pd.DataFrame:
    """Eight predictions, two per cell (ai/real x correct/misclassified)."""
    labels = ["ai", "ai", "ai", "ai", "real", "real", "real", "real"]
    scores = [0.95, 0.7, 0.4, 0.1, 0.05, 0.3, 0.6, 0.85]
    n = len(labels)
    rows = pd.DataFrame(
        {
            "sha256": [f"{i:02d}" * 32 for i in range(n)],
            "group": groups or [f"person{i % 3}" for i in range(n)],
            "label": labels,
            "source": ["search:bing"] * n,
            "url": urls or [f"http://127.0.0.1/img{i}.jpg" for i in range(n)],
            "keyword": groups or [f"person{i % 3}" for i in range(n)],
        }
    )
    return predictions_table(rows, np.array(scores), threshold=0.5)


def write_report(tmp_path: Path, model: TinyClassifier, predictions: pd.DataFrame) -> tuple[Path, pd.DataFrame]:
    """Select examples, build the report with one plot, return (index path, selected rows)."""
    selected = select_examples(predictions, per_cell=2)
    positions = [predictions.index[predictions["sha256"] == sha][0] for sha in selected["sha256"]]
    images = random_images(len(predictions), 32)[positions]
    plot = plot_roc(predictions, tmp_path / "eval" / "roc.png")
    index = build_report(
        tmp_path / "report",
        model,
        images,
        selected,
        metrics={"accuracy": 0.5, "roc_auc": float("nan"), "tp": 2.0},
        per_group=per_group_accuracy(predictions),
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="aidetect test report",
        plots={"roc": plot},
        run_info={"run_id": "abc123", "model": "resnet18"},
    )
    return index, selected


def parse(index: Path) -> ImageTags:
    parser = ImageTags()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def test_build_report_embeds_both_pictures_of_every_selected_image(tmp_path: Path, model: TinyClassifier) -> None:
    predictions = make_predictions()
    index, selected = write_report(tmp_path, model, predictions)
    assert index == tmp_path / "report" / "index.html", f"unexpected index path {index}"
    tags = parse(index)
    by_file = {tag.get("data-file"): tag.get("src") or "" for tag in tags.images}
    for src in by_file.values():
        # MLflow's artifact view loads the HTML from a blob: URL, where relative file links cannot resolve.
        assert src.startswith("data:image/png;base64,"), f"picture {src[:40]!r} is not embedded in the page"
    for sha in selected["sha256"]:
        for kind in ("orig", "cam"):
            name = f"img/{sha}_{kind}.png"
            assert name in by_file, f"{kind} picture of {sha[:8]} is not in the report"
            embedded = base64.b64decode(by_file[name].split(",", 1)[1])
            assert embedded == (index.parent / name).read_bytes(), f"embedded {name} differs from the file beside it"
            with Image.open(io.BytesIO(embedded)) as picture:
                assert picture.size == (32, 32), f"{kind} picture has size {picture.size}, expected 32x32"
    assert by_file.get("plots/roc.png", "").startswith("data:image/png"), "the ROC plot is not embedded"
    assert (index.parent / "plots" / "roc.png").is_file(), "the ROC plot was not copied into the report folder"
    text = index.read_text(encoding="utf-8")
    assert "abc123" in text and "aidetect test report" in text, "run info or title missing from the report"
    for link in tags.links:
        assert link.startswith(("#", "http://", "https://")), f"link {link!r} would break outside the folder"


def test_every_example_shows_p_ai_group_and_source(tmp_path: Path, model: TinyClassifier) -> None:
    predictions = make_predictions()
    index, selected = write_report(tmp_path, model, predictions)
    examples = Examples()
    examples.feed(index.read_text(encoding="utf-8"))
    assert sorted(examples.found) == sorted(selected["sha256"]), "the report's examples are not the selected rows"
    for row in selected.itertuples():
        text = " ".join(examples.found[row.sha256].split())
        assert f"p_ai {row.p_ai:.3f}" in text, f"p_ai of {row.sha256[:8]} missing: {text!r}"
        assert f"group {row.group}" in text, f"group of {row.sha256[:8]} missing: {text!r}"
        assert f"source {row.source}: {row.url}" in text, f"source/url of {row.sha256[:8]} missing: {text!r}"
        assert ("Original" in text) and ("Grad-CAM" in text), "each example must caption Original | Grad-CAM"


def test_report_lists_calibration_metric(tmp_path: Path, model: TinyClassifier) -> None:
    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1).head(1)
    index = build_report(
        tmp_path / "r",
        model,
        random_images(1, 32),
        selected,
        metrics={"accuracy": 0.5, "ece": 0.125, "zzz_other": 1.0},
        per_group=per_group_accuracy(predictions),
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="t",
    )
    text = index.read_text(encoding="utf-8")
    assert "<td>ece</td><td class=\"num\">0.1250</td>" in text, "ECE is not shown in the summary metrics"
    assert text.index("<td>ece</td>") < text.index("<td>zzz_other</td>"), "ECE should be a headline metric"


def test_build_report_escapes_crawled_text(tmp_path: Path, model: TinyClassifier) -> None:
    groups = [HOSTILE_GROUP] * 4 + ["ok"] * 4
    urls = [HOSTILE_URL] * 4 + ["javascript:alert(3)"] * 4
    index, _ = write_report(tmp_path, model, make_predictions(groups, urls))
    text = index.read_text(encoding="utf-8")
    assert "<script" not in text, "a crawled group name reached the HTML unescaped"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, "the hostile group should be shown, escaped"
    tags = parse(index)
    assert all("onerror" not in tag for tag in tags.images), "a crawled url injected an <img onerror=...>"
    assert all(not link.lower().startswith("javascript:") for link in tags.links), "a javascript: url became a link"


@pytest.mark.parametrize("cam_target", ["predicted", "ai", "real"])
def test_cams_explain_the_configured_target(tmp_path: Path, model: TinyClassifier, cam_target: str) -> None:
    from pipeline_lib.assess.cam import cam_overlay, compute_cams, png_bytes

    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1).reset_index(drop=True)
    images = random_images(len(selected), 96, seed=4)  # layer4 maps 3x3: at 32 px every CAM is flat
    index = build_report(
        tmp_path / "r",
        model,
        images,
        selected,
        metrics={"accuracy": 0.5},
        per_group=per_group_accuracy(predictions),
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="t",
        cam_target=cam_target,
    )
    explained = selected["predicted"] if cam_target == "predicted" else [cam_target] * len(selected)
    classes = [("real", "ai").index(name) for name in explained]
    cams = compute_cams(model, images, model.net.layer4[-1], target_class=classes)  # one batch, as the report does
    for i, row in selected.iterrows():
        written = (index.parent / "img" / f"{row['sha256']}_cam.png").read_bytes()
        expected = png_bytes(cam_overlay(images[i], cams[i])[1])
        assert written == expected, f"row {i} (predicted {row['predicted']}) explains another class"
    text = index.read_text(encoding="utf-8")
    said = {"predicted": "each image&#39;s predicted class", "ai": "the “ai” class", "real": "the “real” class"}
    assert f'<strong class="cam-target">{said[cam_target]}</strong>' in text, "the report must say what CAMs explain"
    if cam_target == "predicted":
        assert "Grad-CAM (real)" in text and "Grad-CAM (ai)" in text


def test_robustness_section_says_the_files_were_degraded(tmp_path: Path, model: TinyClassifier) -> None:
    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1).head(1)
    metrics = {"accuracy": 0.9, "robust.jpeg75.accuracy": 0.8, "robust.jpeg75.roc_auc": 0.85}
    index = build_report(
        tmp_path / "r",
        model,
        random_images(1, 32),
        selected,
        metrics=metrics,
        per_group=per_group_accuracy(predictions),
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="t",
    )
    text = " ".join(index.read_text(encoding="utf-8").split())
    assert "The original test files degraded as a user would degrade them (re-encoded as JPEG at quality" in text
    assert "same preprocessing as training" in text and "not to the model-input tensor" in text
    assert "<td>jpeg75</td><td class=\"num\">0.8000</td><td class=\"num\">0.1000</td>" in text


class Sections(HTMLParser):
    """The text of the warnings box (by kind) and the order of the page's top-level sections and headings."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: dict[str, str] = {}
        self.order: list[str] = []
        self.kind: str | None = None
        self.appendix_open: bool | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "li" and values.get("class") == "warning":
            self.kind = values.get("data-kind") or ""
            self.warnings[self.kind] = ""
        if values.get("id") in ("headline", "warnings", "learning-curves", "details", "appendix"):
            self.order.append(str(values["id"]))
        if tag == "details" and values.get("id") == "appendix":
            self.appendix_open = "open" in values

    def handle_endtag(self, tag: str) -> None:
        if tag == "li":
            self.kind = None

    def handle_data(self, data: str) -> None:
        if self.kind is not None:
            self.warnings[self.kind] += data


def test_report_leads_with_headline_warnings_and_curves(tmp_path: Path, model: TinyClassifier) -> None:
    from pipeline_lib.assess.report_content import headline, report_warnings
    from pipeline_lib.learn.history import plot_learning_curves

    predictions = make_predictions()
    selected = select_examples(predictions, per_cell=1)
    originals = {}
    for sha in selected["sha256"]:  # stored originals larger than the model input: shown at display size
        originals[sha] = tmp_path / "store" / f"{sha}.jpg"
        originals[sha].parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (640, 480), (200, 30, 30)).save(originals[sha])
    history = [
        {"epoch": 1, "phase": "head", "train_loss": 0.7, "train_accuracy": 0.5, "val_loss": 0.69, "val_accuracy": 0.5},
        {"epoch": 2, "phase": "all", "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7},
    ]
    curves = plot_learning_curves(history, tmp_path / "curves.png")
    metrics = {"accuracy": 0.75, "accuracy_ci_low": 0.45, "accuracy_ci_high": 0.95, "roc_auc": 0.8, "n_test": 8.0}
    metrics |= {"cam.border_share_mean": 0.7, "cam.n_border_flagged": 6.0, "cam.n": 8.0, "cam.flag_above": 0.5}
    notes = [
        "format-shortcut audit [warn] on the train split, stored files: metadata-only ROC-AUC 1.000 (format)",
        "crawl health: bing 'anna' no_results: the engine returned nothing",
        "largest groups: person0 (2 ai, test)",
    ]
    index = build_report(
        tmp_path / "report",
        model,
        random_images(len(selected), 32),
        selected,
        metrics=metrics,
        per_group=per_group_accuracy(predictions),
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="t",
        plots={"learning_curves": curves, "roc": plot_roc(predictions, tmp_path / "roc.png")},
        originals=originals,
        warnings=report_warnings(notes, metrics, "SYNTHETIC demo data"),
        top=headline(metrics, "resnet18 (abcd1234)", "split-0123"),
    )
    text = index.read_text(encoding="utf-8")
    page = Sections()
    page.feed(text)
    assert page.order == ["headline", "warnings", "learning-curves", "details", "appendix"], page.order
    assert set(page.warnings) == {"data", "format shortcut", "crawler health", "small sample", "CAM attention"}
    assert "ROC-AUC 1.000" in page.warnings["format shortcut"] and "0.50 wide" in page.warnings["small sample"]
    assert "largest groups" not in "".join(page.warnings.values())
    assert page.appendix_open is False  # raw metrics are collapsed
    assert 'id="headline-accuracy">0.750<' in text and "95% CI 0.450-0.950" in text and "split-0123" in text
    sha = str(selected["sha256"].iloc[0])
    with Image.open(tmp_path / "report" / "img" / f"{sha}_orig.png") as shown:
        assert shown.size == (256, 192), "the Original is the stored file at display size, not the 32 px input"


def test_counts_are_totals_and_only_public_urls_are_links(tmp_path: Path, model: TinyClassifier) -> None:
    from pipeline_lib.assess.report import WORST_GROUPS
    from pipeline_lib.assess.report_content import cell_counts
    from pipeline_lib.assess.stats import per_generator_metrics

    public = "https://upload.wikimedia.org/a.jpg"
    urls = [public, "http://127.0.0.1:47811/img/1.jpg", "http://192.168.1.5/2.jpg", "http://localhost/3.jpg"] * 2
    predictions = make_predictions(urls=urls).assign(generator=["gena", "genb", "gena", "genb"] + [""] * 4)
    selected = select_examples(predictions, per_cell=1)  # each cell holds 2 images: 1 of them is shown
    many_groups = pd.DataFrame(
        {"group": [f"g{i:02d}" for i in range(WORST_GROUPS + 5)], "label": "ai", "n": 2, "accuracy": 0.5}
    )
    index = build_report(
        tmp_path / "r",
        model,
        random_images(len(selected), 32),
        selected,
        metrics={"accuracy": 0.5},
        per_group=many_groups,
        target_layer=model.net.layer4[-1],
        cam_method="gradcam",
        title="t",
        per_generator=per_generator_metrics(predictions, 0.5),
        cell_totals=cell_counts(predictions),
        held_out_generator="genb",
    )
    text = " ".join(index.read_text(encoding="utf-8").split())
    assert f"Showing {WORST_GROUPS} of {WORST_GROUPS + 5} groups of the test split" in text, "not a total"
    assert "Real photos taken for AI images (1 shown of 2)" in text and "1 shown of 2: the most confident" in text
    links = parse(index).links
    shown = set(selected["url"])
    assert public in shown and {link for link in links if not link.startswith("#")} == {public}, links
    for url in shown - {public}:
        assert url in text, f"{url} must still be shown, as text"
    assert '<tr class="held-out"><td>genb <strong>(held out: not trained on)</strong>' in text
    assert "<tr><td>gena</td>" in text and "<strong>genb</strong> was held out of training and validation" in text
