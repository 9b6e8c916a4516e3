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
    assert browser.find_element(By.CSS_SELECTOR, "section.group h2 span").text == HOSTILE_GROUP, "shown as text"
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
    # Mouse: reject the second card as a duplicate, approve the rest of the last group by its button.
    cards[1].find_element(By.CSS_SELECTOR, "select.reason option[value='duplicate']").click()
    cards[1].find_element(By.CSS_SELECTOR, "button.reject").click()
    wait.until(lambda _: progress.text == "3 of 5 decided")
    browser.find_elements(By.CSS_SELECTOR, "button.approve-rest")[-1].click()
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
