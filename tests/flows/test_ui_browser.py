"""`aidetect ui` in headless chromium: the page it prints opens MLflow's runs table of the aidetect experiment in the
training view, stage runs nested under their pipeline run, without GenAI pages or the usage-data banner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline_lib.core.tracking.runs import start_run
from pipeline_lib.core.tracking.stage_runs import stage_run
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.workspace import Workspace
from tests.flows.browser import chromium
from tests.flows.gate_helpers import DEADLINE_S
from tests.flows.mlflow_server import free_port, stop, wait_healthy
from tests.network_guard import guarded_environment, read_log

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "pipeline-run-1"
STAGES = ("crawl", "train", "evaluate")
GENAI_ONLY = ("Detect Issues", "Token Usage", "Evaluation runs", "Sessions", "Judges")  # MLflow 3.17's GenAI view
BANNER = "collects usage data"  # MLflow's home page: "MLflow collects usage data to improve the product"
RUN_LINKS = "[role=gridcell] a[href*='/runs/']"  # run names in the runs table
EXPAND = "[role=gridcell] button[data-component-id*='runnamecellrenderer']"  # the [+] beside a parent run


def _workspace_with_a_run(root: Path) -> Workspace:
    """A workspace whose MLflow store holds one pipeline run with a nested run per stage."""
    workspace = Workspace.create(root)
    parent = start_run(tracking_uri(None, workspace), "aidetect", workspace, RUN_NAME, {"aidetect.kind": "pipeline"})
    for stage in STAGES:
        stage_run(parent, stage, "Completed", {"stage.items": 3.0}, seconds=2.0)
    parent.finish()
    return workspace


def _run_names(browser: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [link.text for link in browser.find_elements(By.CSS_SELECTOR, RUN_LINKS) if link.text]


def _page_text(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def test_ui_opens_the_runs_table_of_the_training_view(tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workspace = _workspace_with_a_run(tmp_path / "ws")
    port, printed = free_port(), tmp_path / "ui.out"
    env, guard_log = guarded_environment(tmp_path / "guard")
    command = [sys.executable, "-c", "from flows.cli import main; main()", "ui", "-w", str(workspace.root)]
    with printed.open("w", encoding="utf-8") as out:
        server = subprocess.Popen([*command, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=out)
    screenshot = tmp_path / "mlflow-ui.png"
    print(f"screenshot of the MLflow UI: {screenshot}")
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, DEADLINE_S)  # it printed the page before it started
        page = printed.read_text(encoding="utf-8").splitlines()[0].split()[2]
        assert page.startswith(f"http://127.0.0.1:{port}/#/experiments/1/runs?"), page
        with chromium(tmp_path / "profile") as browser:
            try:
                browser.get(page)
                wait = WebDriverWait(browser, DEADLINE_S)
                wait.until(lambda b: _run_names(b))
                top_level = _run_names(browser)
                browser.find_element(By.CSS_SELECTOR, EXPAND).click()
                wait.until(lambda b: set(STAGES) <= set(_run_names(b)))
                text, url = _page_text(browser), browser.current_url
            finally:
                browser.save_screenshot(str(screenshot))
    finally:
        stop(server)
    assert top_level == [RUN_NAME], f"stage runs must be nested under their pipeline run: {top_level} ({screenshot})"
    assert "/runs?" in url and "workflowType=machine_learning" in url, f"not the training view's runs table: {url}"
    shown = [item for item in GENAI_ONLY if item in text]
    assert not shown, f"GenAI view elements shown: {shown} (see {screenshot})"
    assert BANNER not in text, f"the usage-data banner is shown (see {screenshot})"
    assert "Model training" in text and "aidetect" in text, f"no training view of aidetect ({screenshot}): {text}"
    assert not [entry for entry in read_log(guard_log) if entry["kind"] == "remote"], read_log(guard_log)
