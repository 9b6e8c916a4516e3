"""Console text for people: aligned, rounded, with intervals and the registered model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from pipeline_lib.acquire.imports import FileOutcome, FolderAccount
from pipeline_lib.ops import summary

RUN = {
    "states": {"crawl": "Cached", "ingest": "Cached", "train": "Completed", "evaluate": "Completed"},
    "seconds": 41.37,
    "metrics": {
        "accuracy": 0.8378378378378378,
        "accuracy_ci_low": 0.7297297,
        "accuracy_ci_high": 0.9459459,
        "n_test": 37.0,
        "roc_auc": 0.95012,
    },
    "registry": {"version": "3", "promoted": True, "reason": "no champion yet", "champion_version": None},
    "registered_model": "aidetect",
    "data_version": "split-0123456789abcdef",
    "report": "/ws/reports/x/report/index.html",
    "mlflow_run_id": "5eea468f",
    "workspace": "/ws",
    "notes": ["format-shortcut audit [warn] on the train split: ROC-AUC 1.000", "largest groups: p1 (4 ai, train)"],
}


def test_run_summary_rounds_and_names_the_model():
    text = "\n".join(summary.run_lines(RUN))
    assert "Pipeline done in 41.4 s: 2 cached (crawl, ingest), 2 computed (train, evaluate)." in text
    assert "test accuracy  0.838 (95% CI 0.730-0.946, n = 37)" in text
    assert "aidetect version 3; champion is now version 3 (there was no champion before)" in text
    assert "0.8378378" not in text and "{" not in text and "'" not in text.replace("doesn't", "")
    warnings = text.split("Warnings:")[1].split("Notes:")[0]
    assert "format-shortcut audit [warn]" in warnings and "largest groups" not in warnings


def test_all_cached_is_said_once():
    assert summary.stage_states({"crawl": "Cached", "train": "Cached"}) == "2 cached"


MCNEMAR = {"mcnemar_p": 0.4142, "mcnemar_verdict": "the difference could be noise"}
WEAKER = {"version": "8", "promoted": False, "alias": "champion", "champion_version": "6", "comparable": True}
WEAKER |= {"challenger_score": 0.78, "champion_score": 0.8} | MCNEMAR


def test_registry_lines_name_the_alias_the_version_that_holds_it_and_mcnemars_verdict():
    assert summary.model_line(WEAKER, "det") == (
        "det version 8; champion stays version 6: this model is not better "
        "(accuracy 0.780 vs 0.800; McNemar p = 0.41, the difference could be noise)"
    )
    better = WEAKER | {
        "promoted": True,
        "challenger_score": 0.9,
        "mcnemar_p": 0.012,
        "mcnemar_verdict": "more than noise",
    }
    assert summary.model_line(better, "det") == (
        "det version 8; champion moved to version 8 (was version 6): this model scores higher "
        "(accuracy 0.900 vs 0.800; McNemar p = 0.012, more than noise)"
    )
    loo = {"version": "9", "promoted": True, "alias": "loo-genb", "champion_version": None, "reason": "no loo-genb yet"}
    assert summary.model_line(loo, "det") == "det version 9; loo-genb is now version 9 (there was no loo-genb before)"
    loo_weaker = WEAKER | {"version": "10", "alias": "loo-genb", "champion_version": "9"}
    assert summary.model_line(loo_weaker, "det").startswith("det version 10; loo-genb stays version 9: this model is")


def test_registry_lines_say_when_promote_is_needed_and_what_it_did():
    unfair = "not comparable: 3 of the 40 test images were in the training or validation data of version 6"
    kept = WEAKER | {"comparable": False, "not_comparable": unfair, "challenger_score": 0.9}
    assert summary.model_line(kept, "det") == (
        f"det version 8; champion stays version 6: {unfair}; pass --promote to move champion to version 8"
    )
    forced = kept | {"promoted": True}
    assert (
        summary.model_line(forced, "det")
        == f"det version 8; champion moved to version 8 (was version 6) by --promote: {unfair}"
    )
    again = {"version": "8", "promoted": False, "alias": "champion", "champion_version": "6", "reused": True}
    earlier = "det version 8 (same checkpoint, registered by an earlier run); "
    assert (
        summary.model_line(again, "det")
        == earlier + "champion stays version 6; pass --promote to move champion to version 8"
    )
    assert summary.model_line(again | {"promoted": True}, "det") == (
        earlier + "champion moved to version 8 (was version 6) by --promote"
    )
    assert summary.model_line(again | {"champion_version": "8"}, "det") == earlier + "champion is version 8"


def test_aligned_and_table_line_up():
    assert summary.aligned([("a", "1"), ("long key", "2")]) == ["  a         1", "  long key  2"]
    lines = summary.table(("name", "n"), [("x", 1), ("yy", 10)])
    assert lines == ["  name   n", "  x      1", "  yy    10"]


def test_folder_account_lists_reasons():
    account = FolderAccount(
        Path("/data/mj"),
        "ai",
        [FileOutcome("a.png", "imported"), FileOutcome("b.txt", "left out", "not an image (text)")],
    )
    lines = summary.account_lines(account)
    assert lines[0] == "2 file(s) in /data/mj (label ai): 1 imported, 1 left out"
    assert "    b.txt: not an image (text)" in lines


def test_predictions_say_which_model_and_one_verdict():
    rows = [
        SimpleNamespace(path="a.jpg", p_ai=0.91, label="ai", verdict="ai", error=None, cam=None),
        SimpleNamespace(path="b.jpg", p_ai=0.55, label="ai", verdict="uncertain", error=None, cam=None),
        SimpleNamespace(path="c.jpg", p_ai=None, label=None, verdict=None, error="unreadable image", cam=None),
    ]
    lines = summary.prediction_lines(rows, "aidetect version 3 (alias champion)")
    assert lines[0] == "scored by aidetect version 3 (alias champion)"
    assert lines[2].split() == ["verdict", "p_ai", "file"]
    assert lines[4].split()[:2] == ["uncertain", "0.550"] and "label" not in lines[2]
