"""The review page in headless Debian chromium (Selenium + chromedriver): a paused flow run is reviewed and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review
from tests.flows.browser import chromium
from tests.flows.gate_helpers import add_images, finished, gate_config, gate_flow, in_thread, wait_until_paused

HOSTILE_GROUP = "<img src=x onerror=alert(1)>\"'"  # a folder name: becomes the group shown on the page


@pytest.fixture
def browser(tmp_path: Path):
    with chromium(tmp_path / "profile") as driver:
        yield driver


def test_review_page_in_a_browser_resumes_the_paused_run(harness, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data, root = tmp_path / "data", tmp_path / "ws"
    add_images(data, "real", "anna", range(0, 2))
    add_images(data, "ai", HOSTILE_GROUP, range(10, 13))
    workspace = Workspace.create(root)
    thread, box = in_thread(gate_flow, gate_config(data, root))
    wait_until_paused(workspace)
    url = review.read_waiting(workspace)["url"]
    assert url.startswith("http://127.0.0.1:")

    browser.get(url)
    wait = WebDriverWait(browser, 20)
    progress = browser.find_element(By.ID, "progress")
    assert progress.text == "0 of 5 decided"
    groups = [span.text for span in browser.find_elements(By.CSS_SELECTOR, ".card .group")]
    assert HOSTILE_GROUP in groups, f"the crawled group name is shown as text: {groups}"
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']"), "crawled markup never becomes elements"
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    shas = [card.get_attribute("data-sha") for card in cards]
    assert len(shas) == 5

    # Keyboard: approve the first card (focus moves on), skip one with j, reject the third with its reason.
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("a")
    wait.until(lambda _: progress.text == "1 of 5 decided")
    body.send_keys("j")
    cards[2].find_element(By.CSS_SELECTOR, "select.reason option[value='several_people']").click()
    cards[2].click()
    body.send_keys("r")
    wait.until(lambda _: progress.text == "2 of 5 decided")
    # Mouse: reject the second card as a duplicate, then approve every remaining image (below suspicion 1).
    cards[1].find_element(By.CSS_SELECTOR, "select.reason option[value='duplicate']").click()
    cards[1].find_element(By.CSS_SELECTOR, "button.reject").click()
    wait.until(lambda _: progress.text == "3 of 5 decided")
    below = browser.find_element(By.ID, "below")
    below.clear()
    below.send_keys("1")
    browser.find_element(By.ID, "approve-below").click()
    wait.until(lambda _: progress.text == "5 of 5 decided")
    assert [card.get_attribute("data-decision") for card in cards].count("reject") == 2

    browser.find_element(By.ID, "note").send_keys("looked at all")
    browser.find_element(By.ID, "finish").click()
    wait.until(lambda _: browser.find_element(By.TAG_NAME, "body").get_attribute("data-finished") == "resumed")
    assert "resumed" in browser.find_element(By.ID, "message").text

    box = finished(thread, box)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result["states"]["review"] == "Completed"
    assert result["statuses"].get("rejected") == 2 and "pending_review" not in result["statuses"]
    lines = [json.loads(line) for line in review.decisions_path(workspace).read_text().splitlines()]
    decided = {line["sha256"]: (line["decision"], line["reason"]) for line in lines}
    assert decided[shas[0]] == ("approve", "")
    assert decided[shas[2]] == ("reject", "several_people")
    assert decided[shas[1]] == ("reject", "duplicate")
    assert {line["reviewer"] for line in lines} == {"web"} and len(decided) == 5


def _queue_workspace(root: Path):
    """Approved demo faces, a crawl of new people with planted errors (an AI portrait and noise in the real folder,
    a photo in the AI folder), and a trained-looking checkpoint to embed them; (workspace, catalog)."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline_lib.core.catalog import new_rows
    from pipeline_lib.learn import models
    from pipeline_lib.ops.demo_faces import class_files
    from tests.assess.test_review_queue import stored

    workspace = Workspace.create(root)
    approved = stored(workspace, class_files(5, 4, 128, "real"), "real", "old-")
    approved += stored(workspace, class_files(5, 4, 128, "ai"), "ai", "old-")
    review.append_decisions(workspace, [review.Decision(str(r["sha256"]), "approve", "", "me") for r in approved])
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise, "JPEG")
    ai_face = next(iter(class_files(7, 1, 128, "ai").values()))
    photo = next(iter(class_files(7, 1, 128, "real").values()))
    pending = stored(workspace, class_files(6, 3, 128, "real"), "real", "new-")
    pending += stored(workspace, class_files(6, 3, 128, "ai"), "ai", "new-")
    odd = {"person-01/odd.png": ai_face, "person-02/noise.jpg": noise.getvalue()}
    pending += stored(workspace, odd, "real", "new-") + stored(workspace, {"prompt-01/photo.jpg": photo}, "ai", "new-")
    torch_model = models.Classifier("resnet18")
    models.save_checkpoint(workspace.models / "run1" / "best.pt", torch_model, {"image_size": 32})
    return workspace, new_rows(approved + pending)


def test_the_queue_page_shows_suspects_first_and_one_key_accepts_the_suggestion(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline_lib.assess.review_queue import QueueSettings, score_queue
    from pipeline_lib.core.tracking.store import tracking_uri
    from pipeline_lib.curate.review_server import create_app, serve_in_background

    workspace, catalog = _queue_workspace(tmp_path / "ws")
    queue = score_queue(workspace, catalog, tracking_uri(None, workspace), "aidetect", QueueSettings(tiny_side=16))
    assert queue.scorer == "model:checkpoint/run1", queue.note
    rows = queue.rows
    threshold = float(rows["suspicion"].iloc[3])  # the four most suspect images are the suspects
    app = create_app(workspace, catalog, reviewer="web", queue=rows, threshold=threshold)
    with serve_in_background(app) as url:
        browser.set_window_size(1280, 1000)
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        assert [card.get_attribute("data-sha") for card in cards] == list(rows["sha256"]), "the queue's order"
        suspects = browser.find_elements(By.CSS_SELECTOR, "#suspects .card")
        expected = list(rows.loc[rows["suspicion"] >= threshold, "sha256"])
        assert [card.get_attribute("data-sha") for card in suspects] == expected, "suspects first"
        first = rows.iloc[0]
        assert cards[0].find_element(By.CSS_SELECTOR, ".reasons li").text == first["reasons"][0]
        browser.save_screenshot(str(tmp_path / "review-queue.png"))

        progress = browser.find_element(By.ID, "progress")
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)  # accept the first card's suggestion
        wait.until(lambda _: progress.text == f"1 of {len(rows)} decided")
        line = json.loads(review.decisions_path(workspace).read_text().splitlines()[-1])
        assert (line["sha256"], line["decision"], line["reason"]) == (
            first["sha256"],
            first["suggested"],
            first["reject_reason"],
        ), "Enter records the suggestion"
        assert line["score"] == first["suspicion"] and line["suggested"] == first["suggested"]
        assert cards[0].get_attribute("data-decision") == first["suggested"]

        browser.find_element(By.ID, "approve-below").click()  # the threshold is pre-filled
        below = rows[rows["suspicion"] < threshold]
        wait.until(lambda _: progress.text == f"{1 + len(below)} of {len(rows)} decided")
    decided = review.read_decisions(workspace)
    assert all(decided[sha].decision == "approve" and decided[sha].reviewer == "web" for sha in below["sha256"])
    assert {round(decided[sha].score, 4) for sha in below["sha256"]} == set(below["suspicion"]), "scores recorded"
