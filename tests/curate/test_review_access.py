"""The review page's guard (pipeline_lib.curate.review_access): its own Host only, same-origin JSON state changes,
bounded bodies, and a token when it listens beyond loopback."""

from __future__ import annotations

import json

from pipeline_lib.curate.review_access import access_token, page_url
from tests.curate.test_review_server import _catalog, _lines, _loopback_client


def test_a_foreign_host_is_refused_dns_rebinding(workspace):
    catalog = _catalog(workspace)
    client = _loopback_client(workspace, catalog)
    body = {"sha256": catalog.sha256[0], "decision": "approve"}
    rebound = {"Host": "attacker.example:8765", "Origin": "http://attacker.example:8765"}
    assert client.post("/api/decisions", json=body, headers=rebound).status_code == 421
    assert client.get("/", headers={"Host": "attacker.example:8765"}).status_code == 421
    assert client.get("/", headers={"Host": "127.0.0.1:9999"}).status_code == 421, "another port is another site"
    assert _lines(workspace) == []
    assert client.get("/").status_code == 200
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200


def test_state_changes_need_a_same_origin_json_request(workspace):
    catalog = _catalog(workspace)
    client = _loopback_client(workspace, catalog)
    body = {"sha256": catalog.sha256[0], "decision": "approve"}
    assert client.post("/api/decisions", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert client.post("/api/approve-rest", json={"group": "g1"}, headers=cross).status_code == 403
    form = client.post("/api/decisions", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert form.status_code == 415, "a plain form post (no preflight) cannot change anything"
    assert _lines(workspace) == []
    same = {"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/decisions", json=body, headers=same).status_code == 200
    assert len(_lines(workspace)) == 1


def test_request_bodies_are_bounded(workspace):
    catalog = _catalog(workspace)
    client = _loopback_client(workspace, catalog)
    big = json.dumps({"sha256": catalog.sha256[0], "decision": "approve", "pad": "x" * 300_000})
    response = client.post("/api/decisions", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(100):
            yield b"x" * 10_000

    streamed = client.post("/api/finish", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert _lines(workspace) == []


def test_a_page_beyond_loopback_needs_its_token(workspace):
    assert access_token("127.0.0.1") is None and access_token("localhost") is None and access_token("::1") is None
    token = access_token("0.0.0.0")
    assert token and len(token) >= 20 and token != access_token("0.0.0.0")
    catalog = _catalog(workspace)
    client = _loopback_client(workspace, catalog, token=token)
    assert client.get("/").status_code == 403
    assert client.post("/api/decisions", json={"sha256": catalog.sha256[0], "decision": "approve"}).status_code == 403
    assert page_url("http://h:1/", token) == f"http://h:1/?token={token}"
    page = client.get(f"/?token={token}")
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert client.post("/api/decisions", json={"sha256": catalog.sha256[0], "decision": "approve"}).status_code == 200
    assert client.get(f"/thumbs/{catalog.sha256[0]}.jpg").status_code == 200, "the cookie carries the token"
