"""The review page's API through FastAPI's TestClient, and the background server on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request

import pytest
from fastapi.testclient import TestClient

from pipeline_lib.core.catalog import new_rows
from pipeline_lib.curate.review import Decision, append_decisions, read_decisions
from pipeline_lib.curate.review_server import FinishResult, create_app, serve_in_background
from tests.conftest import make_image

HOSTILE = "<script>alert('x')</script>\"'"


def _catalog(workspace, n=4):
    rows = []
    for i in range(n):
        sha = f"{i:x}".ljust(64, "e")
        path = make_image(workspace.store / sha[:2] / f"{sha}.jpg", seed=i)
        rows.append(
            {
                "sha256": sha,
                "path": workspace.relative(path),
                "label": "real" if i % 2 else "ai",
                "group": "g1" if i < 2 else "g2",
                "keyword": HOSTILE,
                "url": f"javascript:alert(1)//{HOSTILE}" if i == 0 else f"http://e.x/{HOSTILE}",
                "status": "ok",
                "width": 48,
                "height": 40,
                "cluster": "",
            }
        )
    return new_rows(rows)


def _lines(workspace):
    path = workspace.review / "decisions.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_decisions_are_appended_with_all_fields(workspace):
    catalog = _catalog(workspace)
    client = TestClient(create_app(workspace, catalog, reviewer="tester"))
    sha = catalog.sha256[1]
    response = client.post("/api/decisions", json={"sha256": sha, "decision": "reject", "reason": "several_people"})
    assert response.status_code == 200, response.text
    assert response.json()["decided"] == 1 and response.json()["total"] == 4
    client.post("/api/decisions", json={"sha256": sha, "decision": "approve"})
    lines = [json.loads(line) for line in _lines(workspace)]
    assert [line["decision"] for line in lines] == ["reject", "approve"]
    assert set(lines[0]) == {"when", "sha256", "decision", "reason", "reviewer"}
    assert lines[0]["reviewer"] == "tester" and lines[0]["reason"] == "several_people" and lines[0]["when"]
    assert read_decisions(workspace)[sha].decision == "approve", "latest wins"
    assert client.get("/api/progress").json() == {"decided": 1, "total": 4, "finished": False}


@pytest.mark.parametrize(
    "body",
    [
        {"sha256": "f" * 64, "decision": "approve"},
        {"sha256": "SHA0", "decision": "approve"},
        {"decision": "approve"},
        {"sha256": "<sha>", "decision": "reject", "reason": "duplicate"},
    ],
)
def test_unknown_sha_gets_4xx_and_writes_nothing(workspace, body):
    client = TestClient(create_app(workspace, _catalog(workspace)))
    response = client.post("/api/decisions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert _lines(workspace) == []


@pytest.mark.parametrize(
    "patch",
    [{"decision": "maybe"}, {"decision": ""}, {"decision": "reject", "reason": "ugly"}, {"reason": "duplicate"}],
)
def test_bad_decision_value_gets_4xx_and_writes_nothing(workspace, patch):
    catalog = _catalog(workspace)
    client = TestClient(create_app(workspace, catalog))
    response = client.post("/api/decisions", json={"sha256": catalog.sha256[0], "decision": "approve"} | patch)
    assert response.status_code == 422, response.text
    assert _lines(workspace) == []


def test_only_undecided_images_are_asked_and_rejected_stays_rejected(workspace):
    catalog = _catalog(workspace)
    append_decisions(workspace, [Decision(catalog.sha256[0], "reject", "unrelated", "earlier")])
    client = TestClient(create_app(workspace, catalog))
    page = client.get("/").text
    assert catalog.sha256[0] not in page and catalog.sha256[1] in page
    assert "0 of 3 decided" in page
    # "approve the rest" and "approve the remaining" never overrule the earlier reject.
    approved = client.post("/api/approve-rest", json={"group": "g1"}).json()["approved"]
    assert approved == [catalog.sha256[1]]
    assert client.post("/api/approve-rest", json={"group": "nope"}).status_code == 404
    finished = client.post("/api/finish", json={"approve_remaining": True, "note": "ok"}).json()
    assert finished["decided"] == finished["total"] == 3 and finished["resumed"] is False
    decisions = read_decisions(workspace)
    assert decisions[catalog.sha256[0]].decision == "reject"
    assert {decisions[sha].decision for sha in catalog.sha256[1:]} == {"approve"}


def test_finish_calls_the_callback_and_thumbnails_are_served(workspace):
    catalog = _catalog(workspace)
    calls = []

    def on_finish(item):
        calls.append((item.approve_remaining, item.note))
        return FinishResult("resumed the run", resumed=True)

    client = TestClient(create_app(workspace, catalog, on_finish=on_finish))
    response = client.get(f"/thumbs/{catalog.sha256[2]}.jpg")
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
    assert client.get(f"/thumbs/{'0' * 64}.jpg").status_code == 404
    result = client.post("/api/finish", json={"note": "<b>n</b>"}).json()
    assert result["resumed"] is True and calls == [(False, "<b>n</b>")]
    assert _lines(workspace) == [], "finish without approve_remaining decides nothing"


def test_background_server_listens_on_loopback_and_stops(workspace):
    app = create_app(workspace, _catalog(workspace))
    with serve_in_background(app, "127.0.0.1", 0) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/progress", timeout=5) as response:
            assert json.loads(response.read())["total"] == 4
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/progress", timeout=2)


# --------------------------------------------------------------------------------------------------------------
# What the page may show: never a quarantined file, never more pixels than allowed, one file per thumbnail


def _loopback_client(workspace, catalog, **kwargs) -> TestClient:
    """A client that talks to the app as a browser on 127.0.0.1:8765 would (the server's own address)."""
    return TestClient(create_app(workspace, catalog, **kwargs), base_url="http://127.0.0.1:8765")


def test_no_thumbnail_of_a_quarantined_file_and_a_pixel_bound(workspace):
    catalog = _catalog(workspace)
    bad_sha = "9" * 64
    quarantined = workspace.quarantine / f"{bad_sha}.jpg"
    quarantined.write_bytes(b"<html>not an image</html>")
    rows = catalog.to_dict("records") + [
        catalog.iloc[0].to_dict() | {"sha256": bad_sha, "path": workspace.relative(quarantined), "status": "invalid:x"}
    ]
    client = _loopback_client(workspace, new_rows(rows), max_pixels=100)
    response = client.get(f"/thumbs/{bad_sha}.jpg")
    assert response.status_code == 404 and "Traceback" not in response.text
    too_big = client.get(f"/thumbs/{catalog.sha256[1]}.jpg")  # 48x40 > 100 pixels
    assert too_big.status_code == 422 and "more than 100" in too_big.json()["detail"]
    assert not list(workspace.review.rglob("*.part*")), "no temporary file is left behind"


def test_concurrent_thumbnail_requests_never_share_a_temporary_file(workspace):
    from concurrent.futures import ThreadPoolExecutor

    catalog = _catalog(workspace)
    app = create_app(workspace, catalog)
    with serve_in_background(app, "127.0.0.1", 0) as url:

        def fetch(_: int) -> bytes:
            with urllib.request.urlopen(url + f"thumbs/{catalog.sha256[2]}.jpg", timeout=30) as response:
                return response.read()

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(fetch, range(16)))
    assert all(body[:2] == b"\xff\xd8" for body in bodies) and len(set(bodies)) == 1


def _queue(catalog, scores):
    """Queue rows for the catalog's images with these suspicions (most suspect first, as the queue sorts them)."""
    import pandas as pd

    rows = [
        {
            "sha256": sha,
            "label": label,
            "group": group,
            "suspicion": score,
            "suggested": "reject" if score >= 0.5 else "approve",
            "reject_reason": "wrong_label" if score >= 0.5 else "",
            "why": f"model says so ({score})",
            "reasons": [f"model says so ({score})", "no face found"],
        }
        for sha, label, group, score in zip(catalog.sha256, catalog.label, catalog.group, scores, strict=True)
    ]
    return pd.DataFrame(rows).sort_values("suspicion", ascending=False).reset_index(drop=True)


def test_with_a_queue_the_page_shows_suspects_first_with_reasons_and_the_suggestion(workspace):
    catalog = _catalog(workspace)
    queue = _queue(catalog, [0.1, 0.95, 0.2, 0.6])
    page = TestClient(create_app(workspace, catalog, queue=queue, threshold=0.5)).get("/").text
    order = [sha for sha in queue.sha256 if f"data-sha='{sha}'" in page]
    positions = [page.index(f"data-sha='{sha}'") for sha in order]
    assert positions == sorted(positions) and len(order) == 4, "cards in queue order"
    suspects = page[page.index("id='suspects'") : page.index("id='rest'")]
    assert catalog.sha256[1] in suspects and catalog.sha256[3] in suspects and catalog.sha256[0] not in suspects
    assert "model says so (0.95)" in suspects and "suggested: <b>reject (wrong_label)</b>" in suspects
    assert "data-suggested='reject'" in suspects and "<option value='wrong_label' selected>" in suspects
    assert "approve every remaining image below suspicion" in page


def test_decisions_on_the_queue_page_record_score_and_suggestion_and_approve_below_is_per_image(workspace):
    catalog = _catalog(workspace)
    queue = _queue(catalog, [0.1, 0.95, 0.2, 0.6])
    client = TestClient(create_app(workspace, catalog, reviewer="web", queue=queue, threshold=0.5))
    sha = catalog.sha256[1]
    assert client.post("/api/decisions", json={"sha256": sha, "decision": "approve"}).status_code == 200
    response = client.post("/api/approve-below", json={"threshold": 0.5})
    assert response.status_code == 200, response.text
    assert sorted(response.json()["approved"]) == sorted([catalog.sha256[0], catalog.sha256[2]])
    lines = [json.loads(line) for line in _lines(workspace)]
    assert (lines[0]["sha256"], lines[0]["score"], lines[0]["suggested"]) == (sha, 0.95, "reject")
    assert {(line["sha256"], line["reviewer"], line["score"]) for line in lines[1:]} == {
        (catalog.sha256[0], "web", 0.1),
        (catalog.sha256[2], "web", 0.2),
    }, "one line per image below the threshold, with its score"
    assert response.json()["decided"] == 3 and catalog.sha256[3] not in read_decisions(workspace), "the suspect waits"
    assert client.post("/api/approve-below", json={"threshold": 2}).status_code == 422
    plain = TestClient(create_app(workspace, catalog))
    assert plain.post("/api/approve-below", json={"threshold": 0.5}).status_code == 409, "no queue, no suspicion"
