import json

import pytest

from pipeline_lib.core.catalog import new_rows
from pipeline_lib.curate.review import (
    Decision,
    ReviewError,
    append_decisions,
    apply_decisions,
    damaged_decisions_path,
    decisions_digest,
    read_decisions,
    read_decisions_csv,
    record_auto_approvals,
    repair_decisions,
)
from tests.conftest import make_image


def _catalog(workspace):
    rows = []
    for i, status in enumerate(["ok", "ok", "ok", "duplicate_of:" + "s0".ljust(64, "0"), "invalid:truncated"]):
        sha = f"s{i}".ljust(64, "0")
        path = make_image(workspace.store / sha[:2] / f"{sha}.jpg", seed=i)
        rows.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": "real",
                "group": "<script>x</script>",
                "url": "http://e.x/\"'><b>",
                "status": status,
                "width": 48,
                "height": 40,
                "cluster": "s0".ljust(64, "0") if i in (0, 3) else "",
            }
        )
    return new_rows(rows)


def test_latest_decision_wins_and_file_is_append_only(workspace):
    sha = "a" * 64
    append_decisions(workspace, [Decision(sha, "reject", "unrelated", "me")])
    append_decisions(workspace, [Decision(sha, "approve", "", "me")])
    assert read_decisions(workspace)[sha].decision == "approve"
    lines = (workspace.review / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line)["decision"] for line in lines] == ["reject", "approve"]
    assert decisions_digest(workspace) != ""


def test_bad_decision_or_unknown_sha_changes_nothing(workspace):
    with pytest.raises(ReviewError, match="must be one of"):
        append_decisions(workspace, [Decision("a" * 64, "approve"), Decision("b" * 64, "maybe")])
    with pytest.raises(ReviewError, match="no image with sha256"):
        append_decisions(workspace, [Decision("c" * 64, "approve")], known={"a" * 64})
    assert not (workspace.review / "decisions.jsonl").exists(), "a rejected batch must write nothing"


def _cut_off(workspace, first: str) -> bytes:
    """A decisions file whose last append was cut off by a crash: one whole line, then half of the next."""
    whole = json.dumps({"sha256": first, "decision": "reject", "reason": "unrelated", "reviewer": "a", "when": "t"})
    half = json.dumps({"sha256": "d" * 64, "decision": "approve", "reason": "", "reviewer": "a", "when": "t"})[:37]
    (workspace.review / "decisions.jsonl").write_text(whole + "\n" + half, encoding="utf-8")
    return half.encode()


def test_a_cut_off_last_line_is_set_aside_never_merged_with_the_next_decision(workspace, caplog):
    first, second = "a" * 64, "b" * 64
    half = _cut_off(workspace, first)
    assert set(read_decisions(workspace)) == {first}, "a cut-off last line is skipped, not fatal"
    assert append_decisions(workspace, [Decision(second, "approve", "", "me")]) == 1
    decisions = read_decisions(workspace)
    assert {sha: d.decision for sha, d in decisions.items()} == {first: "reject", second: "approve"}
    lines = (workspace.review / "decisions.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1]), "whole lines only"
    assert damaged_decisions_path(workspace).read_bytes() == half + b"\n", "the cut-off bytes are kept"
    assert "cut off" in caplog.text and "decisions.jsonl.damaged" in caplog.text


def test_a_whole_last_line_without_its_newline_is_kept(workspace):
    line = json.dumps({"sha256": "a" * 64, "decision": "approve", "reason": "", "reviewer": "a", "when": "t"})
    (workspace.review / "decisions.jsonl").write_text(line, encoding="utf-8")
    append_decisions(workspace, [Decision("b" * 64, "reject", "other", "me")])
    assert set(read_decisions(workspace)) == {"a" * 64, "b" * 64}
    assert not damaged_decisions_path(workspace).exists()


def test_repair_sets_aside_every_line_that_is_not_a_decision(workspace):
    first = "a" * 64
    append_decisions(workspace, [Decision(first, "approve", "", "me")])
    with open(workspace.review / "decisions.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    append_decisions(workspace, [Decision("b" * 64, "reject", "other", "me")])
    with pytest.raises(ReviewError, match=r"decisions.jsonl:2 .*doctor --repair"):
        read_decisions(workspace)
    messages = repair_decisions(workspace)
    assert len(messages) == 1 and "1 line(s)" in messages[0]
    assert set(read_decisions(workspace)) == {first, "b" * 64}
    assert damaged_decisions_path(workspace).read_text() == "{not json\n"
    assert repair_decisions(workspace) == []


def test_modes(workspace):
    catalog = _catalog(workspace)
    decisions = {catalog.sha256[1]: Decision(catalog.sha256[1], "reject", "other")}
    auto = apply_decisions(catalog, decisions, "auto")
    assert (auto.rejected, auto.auto_approved, auto.pending) == (1, 2, 0)
    required = apply_decisions(catalog, decisions, "require")
    assert required.pending == 2 and list(required.catalog.status[:3]) == [
        "pending_review",
        "rejected",
        "pending_review",
    ]
    assert catalog.status[0] == "ok", "input must not be mutated"


def test_auto_mode_records_its_approvals_once_and_people_still_win(workspace):
    catalog = _catalog(workspace)
    append_decisions(workspace, [Decision(catalog["sha256"][1], "reject", "unrelated", "alice")])
    assert record_auto_approvals(workspace, catalog) == 2, "the two undecided ok images (not duplicates, not invalid)"
    decisions = read_decisions(workspace)
    assert {sha[:2]: (d.decision, d.reviewer) for sha, d in decisions.items()} == {
        "s0": ("approve", "auto"),
        "s1": ("reject", "alice"),
        "s2": ("approve", "auto"),
    }
    digest = decisions_digest(workspace)
    assert record_auto_approvals(workspace, catalog) == 0 and decisions_digest(workspace) == digest, "appended twice"
    outcome = apply_decisions(catalog, read_decisions(workspace), "auto")
    assert (outcome.approved, outcome.rejected, outcome.auto_approved, outcome.pending) == (2, 1, 2, 0)


def test_csv_decisions(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sha256,decision,reason\n" + "a" * 64 + ",reject,duplicate\n" + "b" * 64 + ",,\n")
    decisions = read_decisions_csv(path)
    assert [(d.decision, d.reason) for d in decisions] == [("reject", "duplicate")]
    (tmp_path / "bad.csv").write_text("hash,verdict\n")
    with pytest.raises(ReviewError, match="lacks column"):
        read_decisions_csv(tmp_path / "bad.csv")


def test_recrawl_asks_only_about_new_images_and_rejected_stays_rejected(workspace):
    from pipeline_lib.curate.review import approve_remaining, undecided

    catalog = _catalog(workspace)
    append_decisions(workspace, [Decision(catalog.sha256[0], "reject", "unrelated", "me")])
    approve_remaining(workspace, catalog, "me")
    assert undecided(catalog, read_decisions(workspace)).empty
    grown = new_rows(list(catalog.to_dict("records")) + [catalog.iloc[1].to_dict() | {"sha256": "n".ljust(64, "0")}])
    assert list(undecided(grown, read_decisions(workspace))["sha256"]) == ["n".ljust(64, "0")]
    outcome = apply_decisions(grown, read_decisions(workspace), "require")
    assert outcome.catalog.status[0] == "rejected" and outcome.pending == 1


def test_assisted_mode_waits_like_require_and_model_approvals_record_who_and_the_score(workspace):
    from pipeline_lib.curate.review import Mark, model_numbers, record_model_approvals

    catalog = _catalog(workspace)
    shas = list(catalog.sha256[:3])
    marks = {shas[0]: Mark(0.05, "approve"), shas[1]: Mark(0.2, "approve"), shas[2]: Mark(0.9, "reject")}
    assert record_model_approvals(workspace, catalog, marks, 0.3, "model:aidetect/3") == 2
    lines = [json.loads(line) for line in (workspace.review / "decisions.jsonl").read_text().splitlines()]
    assert [(line["sha256"], line["reviewer"], line["score"]) for line in lines] == [
        (shas[0], "model:aidetect/3", 0.05),
        (shas[1], "model:aidetect/3", 0.2),
    ], "one line per image below the threshold, with the model as reviewer and the image's suspicion"
    outcome = apply_decisions(catalog, read_decisions(workspace), "assisted")
    assert outcome.pending == 1 and outcome.catalog.status[2] == "pending_review", "the suspect waits for a person"
    assert model_numbers(read_decisions(workspace), set(shas)) == {
        "approved_by_model": 2,
        "model_suspects_overturned": 0,
    }
    with pytest.raises(ValueError, match="model:"):
        record_model_approvals(workspace, catalog, marks, 0.3, "someone")


def test_a_later_human_decision_overrides_the_model_and_overturned_suspects_are_counted(workspace):
    from pipeline_lib.curate.review import Mark, marked, model_numbers, record_model_approvals

    catalog = _catalog(workspace)
    shas = list(catalog.sha256[:3])
    marks = {shas[0]: Mark(0.1, "approve"), shas[1]: Mark(0.15, "approve"), shas[2]: Mark(0.8, "reject")}
    record_model_approvals(workspace, catalog, marks, 0.3, "model:aidetect/3")
    person = [
        marked(Decision(shas[0], "reject", "unrelated", "me"), marks),
        marked(Decision(shas[2], "approve", "", "me"), marks),
    ]
    append_decisions(workspace, person)
    decisions = read_decisions(workspace)
    assert decisions[shas[0]].decision == "reject" and decisions[shas[0]].reviewer == "me", "the person wins"
    assert decisions[shas[2]].suggested == "reject" and decisions[shas[2]].score == 0.8
    outcome = apply_decisions(catalog, decisions, "assisted")
    assert outcome.catalog.status[0] == "rejected" and outcome.pending == 0
    assert model_numbers(decisions, set(shas)) == {"approved_by_model": 1, "model_suspects_overturned": 1}
    assert record_model_approvals(workspace, catalog, marks, 0.3, "model:aidetect/4") == 0, "decided images stay"


def test_score_and_suggestion_are_written_only_when_known_and_checked(workspace):
    append_decisions(workspace, [Decision("a" * 64, "approve", "", "me")])
    assert set(json.loads((workspace.review / "decisions.jsonl").read_text())) == {
        "sha256",
        "decision",
        "reason",
        "reviewer",
        "when",
    }, "a decision without a queue keeps the old line format"
    with pytest.raises(ReviewError, match="0..1"):
        append_decisions(workspace, [Decision("b" * 64, "approve", "", "me", score=1.5)])
    with pytest.raises(ReviewError, match="approve or reject"):
        append_decisions(workspace, [Decision("b" * 64, "approve", "", "me", suggested="maybe")])
    with pytest.raises(ValueError, match="assisted"):
        apply_decisions(_catalog(workspace), {}, "sometimes")
