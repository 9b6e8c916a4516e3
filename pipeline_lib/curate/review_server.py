"""The review page: a FastAPI app (plain HTML/JS, no build step) that appends decisions to review/decisions.jsonl."""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from pipeline_lib.core.catalog import INVALID_PREFIX, STATUS_OK, STATUS_PENDING
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_pack

log = logging.getLogger(__name__)

REASONS = ("duplicate", "several_people", "unrelated", "other")
MAX_BODY_BYTES = 64 * 1024  # the page's JSON posts are a few hundred bytes
TOKEN_COOKIE = "aidetect_review_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class DecisionIn(BaseModel):
    """One decision posted by the page."""

    sha256: str = Field(min_length=1, max_length=128)
    decision: Literal["approve", "reject"]
    reason: Literal["", "duplicate", "several_people", "unrelated", "other"] = ""


class GroupIn(BaseModel):
    group: str


class FinishIn(BaseModel):
    """The same fields as the flow's RunInput form."""

    approve_remaining: bool = False
    note: str = Field("", max_length=2000)


@dataclass(frozen=True)
class FinishResult:
    """What on_finish reports back to the page."""

    message: str
    resumed: bool = False


OnFinish = Callable[[FinishIn], FinishResult]


class ReviewServerError(RuntimeError):
    """The review page could not be served (e.g. the port is taken)."""


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether a listen address or host name stays on this machine."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def access_token(host: str) -> str | None:
    """A fresh random token when the page listens on anything but loopback (then every request must carry it)."""
    return None if is_loopback(host) else secrets.token_urlsafe(18)


def page_url(base: str, token: str | None) -> str:
    """The URL to open: base, with ?token=... when the page needs one."""
    return f"{base}?token={token}" if token else base


def exposure_warning(host: str) -> str:
    """What a user must know when the page listens beyond loopback."""
    return (
        f"the review page listens on {host}, not only on this machine: anyone who can reach it and has the URL "
        "(it carries a random token) can decide images. Use --host 127.0.0.1 unless you need that"
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


def _split_host(value: str) -> tuple[str, int | None]:
    """('name', port) of a Host header value (IPv6 in brackets); port None when absent or malformed."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", -1


class RequestGuard:
    """ASGI middleware: the page's own Host only, same-origin state changes, a token off loopback, bounded bodies.

    - Host: the name must be the address the request came in on (or localhost on loopback, or this machine's name
      when listening beyond loopback) and the port the server's: a DNS-rebinding page's Host is refused.
    - POST: an Origin (or Sec-Fetch-Site) from another site is refused, and the body must be JSON.
    - token: when set, every request carries it (?token= on the page URL, then an HttpOnly SameSite cookie).
    - bodies over MAX_BODY_BYTES get 413 before more is read.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], token: str | None, extra_hosts: frozenset[str]) -> None:
        self.app = app
        self.token = token
        self.extra_hosts = extra_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        problem = self._host_problem(scope, headers) or self._origin_problem(scope, headers)
        problem = problem or self._token_problem(scope, headers)
        if problem:
            await _reply(send, problem[0], problem[1])
            return
        body = await _bounded_body(scope, headers, receive)
        if body is None:
            await _reply(send, 413, f"request body larger than {MAX_BODY_BYTES} bytes")
            return
        await self.app(scope, _replay(body, receive), self._with_cookie(scope, send))

    def _allowed_names(self, scope: Scope) -> set[str]:
        server = scope.get("server") or ("", None)
        names = {str(server[0]).lower()} | set(self.extra_hosts)
        if is_loopback(str(server[0])):
            names |= LOOPBACK_NAMES
        else:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return names

    def _host_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        name, port = _split_host(headers.get("host", ""))
        server_port = (scope.get("server") or ("", None))[1]
        expected_port = port if port is not None else (443 if scope.get("scheme") == "https" else 80)
        if name not in self._allowed_names(scope) or (server_port is not None and expected_port != server_port):
            log.warning("review page: refused a request for Host %r", headers.get("host", ""))
            return 421, "this page only answers for its own address (Host header refused)"
        return None

    def _origin_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if scope.get("method") in ("GET", "HEAD"):
            return None
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
        origin = headers.get("origin")
        if origin is not None and origin.lower() != own:
            return 403, f"cross-origin request refused (Origin {origin!r})"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, "cross-site request refused"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "state changes take a JSON body (Content-Type: application/json)"
        return None

    def _token_problem(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if self.token is None:
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookie = SimpleCookie(headers.get("cookie", "")).get(TOKEN_COOKIE)
        given = [query, cookie.value if cookie is not None else ""]
        if any(value and hmac.compare_digest(value, self.token) for value in given):
            return None
        return 403, "this review page needs its token: open the URL it printed (…/?token=…)"

    def _with_cookie(self, scope: Scope, send: Send) -> Send:
        """send(), adding the token cookie to the page's response so that its later requests carry it."""
        if self.token is None or scope.get("path") != "/":
            return send
        cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie.encode())])
            await send(message)

        return sending


async def _bounded_body(scope: Scope, headers: dict[str, str], receive: Receive) -> bytes | None:
    """The whole request body, or None as soon as it (declared or received) exceeds MAX_BODY_BYTES."""
    try:
        declared = int(headers.get("content-length", "0") or 0)
    except ValueError:
        declared = 0
    if declared > MAX_BODY_BYTES:
        return None
    body, more = b"", scope.get("method") not in ("GET", "HEAD")
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        more = bool(message.get("more_body"))
        if len(body) > MAX_BODY_BYTES:
            return None
    return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the app the body read already, then waits for the client as before."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, detail: str) -> None:
    """A small JSON error response (the page shows `detail`)."""
    body = json.dumps({"detail": detail}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def thumbnail_paths(catalog: pd.DataFrame, todo: pd.DataFrame, decided: set[str]) -> dict[str, str]:
    """sha256 -> stored path of the images the page may show: pending, decided, and the near-duplicates shown
    beside pending ones; never a quarantined (invalid) file."""
    valid = catalog[~catalog["status"].astype(str).str.startswith(INVALID_PREFIX)]
    valid = valid[valid["path"].astype(str).str.startswith("store/")]
    clusters = set(todo["cluster"].astype(str)) - {""}
    shown = valid["sha256"].isin(set(todo["sha256"]) | decided) | valid["cluster"].isin(clusters)
    return dict(zip(valid[shown]["sha256"], valid[shown]["path"], strict=True))


def create_app(
    workspace: Workspace,
    catalog: pd.DataFrame,
    on_finish: OnFinish | None = None,
    reviewer: str = "web",
    thumbnail_size: int = 160,
    tiny_side: int = 128,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    max_pixels: int = review_pack.THUMBNAIL_MAX_PIXELS,
) -> FastAPI:
    """The review app for the images of catalog that are undecided now (ok/pending rows without a decision).

    token: required on every request when set (see access_token: the page listens beyond loopback);
    allowed_hosts: extra Host names to answer for (e.g. a reverse proxy's name).
    """
    candidates = catalog[catalog["status"].isin([STATUS_OK, STATUS_PENDING])].drop_duplicates("sha256")
    decided_before = review.read_decisions(workspace)
    todo = review.undecided(candidates, decided_before)
    known = set(candidates["sha256"])
    todo_shas = list(todo["sha256"])
    paths = thumbnail_paths(catalog, todo, set(decided_before) & set(catalog["sha256"]))
    hints = review_pack.review_hints(workspace, catalog, todo, tiny_side)
    lock = threading.Lock()
    finished: dict[str, object] = {}
    app = FastAPI(title="aidetect review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, token=token, extra_hosts=frozenset(h.lower() for h in allowed_hosts))

    def progress() -> dict[str, int]:
        decided = review.read_decisions(workspace)
        return {"decided": sum(sha in decided for sha in todo_shas), "total": len(todo_shas)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        decided = review.read_decisions(workspace)
        return render_page(catalog, todo, decided, hints, progress(), review.read_waiting(workspace) is not None)

    @app.get("/api/progress")
    def get_progress() -> dict[str, object]:
        return progress() | {"finished": bool(finished)}

    @app.get("/thumbs/{name}")
    def thumb(name: str) -> FileResponse:
        sha = name.removesuffix(".jpg")
        if sha not in paths:
            raise HTTPException(404, f"no image with sha256 {sha!r} is shown on this page")
        target = review.thumbnail_path(workspace, sha)  # made on first request, then cached
        try:
            review_pack.write_thumbnail(workspace.root / str(paths[sha]), target, thumbnail_size, max_pixels)
        except review_pack.ThumbnailError as error:
            raise HTTPException(422, str(error)) from None
        return FileResponse(target, media_type="image/jpeg")

    @app.post("/api/decisions")
    def decide(item: DecisionIn) -> dict[str, object]:
        if item.sha256 not in known:
            raise HTTPException(404, f"no image with sha256 {item.sha256!r} awaits review here")
        if item.decision == "approve" and item.reason:
            raise HTTPException(422, "an approve decision takes no reason")
        with lock:
            review.append_decisions(
                workspace, [review.Decision(item.sha256, item.decision, item.reason, reviewer)], known
            )
        return progress() | {"sha256": item.sha256, "decision": item.decision, "reason": item.reason}

    @app.post("/api/approve-rest")
    def approve_rest(item: GroupIn) -> dict[str, object]:
        if item.group not in set(todo["group"]):
            raise HTTPException(404, f"no group {item.group!r} among the images to review")
        with lock:
            before = set(review.read_decisions(workspace))
            review.approve_remaining(workspace, todo, reviewer, group=item.group)
        approved = [sha for sha in todo[todo["group"] == item.group]["sha256"] if sha not in before]
        return progress() | {"approved": approved}

    @app.post("/api/finish")
    def finish(item: FinishIn) -> dict[str, object]:
        with lock:
            if item.approve_remaining:
                review.approve_remaining(workspace, todo, reviewer, note=item.note)
            state = progress()
            left = state["total"] - state["decided"]
            if on_finish is not None:
                result = on_finish(item)
            else:
                result = FinishResult(
                    f"decisions saved ({left} still undecided); run `aidetect run --workspace {workspace.root}` "
                    "again to continue (stages before the gate come back Cached)"
                )
            finished.update(message=result.message, resumed=result.resumed)
        log.info("review finished: %s", result.message)
        return state | {"message": result.message, "resumed": result.resumed}

    return app


def _card(row: object, decided: dict[str, review.Decision], hints: list[review_pack.Hint], members: pd.DataFrame) -> str:
    """One image to decide, all crawled text escaped."""
    esc = html.escape
    r = row
    decision = decided.get(r.sha256)
    state = f"{decision.decision} ({decision.reason})" if decision and decision.reason else ""
    state = state or (decision.decision if decision else "")
    url = str(r.url)
    options = "".join(f"<option value='{v}'{' selected' if v == 'other' else ''}>{v}</option>" for v in REASONS)
    cluster = ""
    if r.cluster and len(members) > 1:
        thumbs = "".join(
            f"<img class='member{' keeper' if m.sha256 == r.cluster else ''}' src='thumbs/{esc(m.sha256)}.jpg' "
            f"title='{esc(str(m.status))}'>"
            for m in members.itertuples()
            if m.sha256 != r.sha256
        )
        keeper = "this is the suggested keeper" if r.sha256 == r.cluster else f"keeper {esc(r.cluster[:12])}"
        cluster = f"<div class='cluster'>near-duplicates ({keeper}): {thumbs}</div>"
    return (
        f"<figure class='card' tabindex='0' data-sha='{esc(r.sha256)}' data-decision='"
        f"{esc(decision.decision) if decision else ''}'>"
        f"<img src='thumbs/{esc(r.sha256)}.jpg' alt='image {esc(r.sha256[:12])}'>"
        f"<figcaption><b class='label'>{esc(str(r.label))}</b> · <span class='group'>{esc(str(r.group))}</span>"
        f" · <span class='keyword'>{esc(str(r.keyword))}</span><br>"
        f"<a class='url' href='{esc(review_pack.safe_href(url))}' rel='noreferrer' target='_blank'>{esc(url[:80])}</a><br>"
        f"{esc(str(r.width))}×{esc(str(r.height))} · <code>{esc(r.sha256[:12])}</code><br>"
        f"{review_pack.hints_html(hints)}{cluster}</figcaption>"
        f"<div class='actions'><button class='approve' type='button'>approve (a)</button> "
        f"<select class='reason' aria-label='reject reason'>{options}</select> "
        f"<button class='reject' type='button'>reject (r)</button></div>"
        f"<div class='state'>{esc(state)}</div></figure>"
    )


def render_page(
    catalog: pd.DataFrame,
    todo: pd.DataFrame,
    decided: dict[str, review.Decision],
    hints: dict[str, list[review_pack.Hint]],
    progress: dict[str, int],
    waiting: bool,
) -> str:
    """The whole review page: one grid per group, every crawled string escaped."""
    esc = html.escape
    clusters = {
        key: members.drop_duplicates("sha256") for key, members in catalog[catalog["cluster"] != ""].groupby("cluster")
    }
    sections = []
    for group, rows in todo.groupby("group", sort=True):
        labels = ", ".join(sorted(set(rows["label"].astype(str))))
        cards = "".join(
            _card(row, decided, hints.get(row.sha256, []), clusters.get(row.cluster, pd.DataFrame()))
            for row in rows.itertuples()
        )
        sections.append(
            f"<section class='group' data-group='{esc(str(group))}'><h2><span>{esc(str(group))}</span> "
            f"<small>({esc(labels)}, {len(rows)})</small></h2>"
            f"<button class='approve-rest' type='button'>approve the rest of this group</button>"
            f"<div class='grid'>{cards}</div></section>"
        )
    body = "".join(sections) or "<p id='nothing'>Nothing to review: every image has a decision.</p>"
    run = "A pipeline run waits for this review." if waiting else "No pipeline run waits; decisions are kept."
    return (
        _PAGE.replace("{{PROGRESS}}", f"{progress['decided']} of {progress['total']} decided")
        .replace("{{RUN}}", esc(run))
        .replace("{{BODY}}", body)
    )


_PAGE = """<!doctype html><html lang='en'><head><meta charset='utf-8'><title>aidetect review</title>
<style>
body{font-family:sans-serif;margin:0}header{position:sticky;top:0;background:#eef;padding:.5em 1em;z-index:2}
main{padding:0 1em}.grid{display:flex;flex-wrap:wrap}.card{width:200px;margin:4px;padding:4px;border:2px solid #ccc;
font-size:11px;word-break:break-all}.card img{max-width:190px}.card:focus,.card.current{outline:3px solid #36f}
.card[data-decision=approve]{border-color:#090;background:#efe}.card[data-decision=reject]{border-color:#c00;
background:#fee}.state{font-weight:bold}.hint{color:#555}.flagged{color:#c00;font-weight:bold}
.cluster img.member{max-width:50px;margin:1px;opacity:.8}.cluster img.keeper{outline:2px solid #090}
#message{font-weight:bold;color:#036}
</style></head><body>
<header><b>aidetect review</b> · <span id='progress'>{{PROGRESS}}</span> · <span id='run'>{{RUN}}</span><br>
keys: <kbd>a</kbd> approve, <kbd>r</kbd> reject (with the card's reason), <kbd>j</kbd>/<kbd>k</kbd> or arrows
next/previous ·
<label><input type='checkbox' id='approve-remaining'> approve the remaining ones</label>
<input id='note' placeholder='note (optional)' maxlength='2000'>
<button id='finish' type='button'>finish review</button> <span id='message' role='status'></span></header>
<main>{{BODY}}</main>
<script>
"use strict";
const cards = Array.from(document.querySelectorAll(".card"));
let current = 0;
function show(message) { document.getElementById("message").textContent = message; }
function select(index) {
  if (!cards.length) return;
  current = Math.max(0, Math.min(cards.length - 1, index));
  cards.forEach((card, i) => card.classList.toggle("current", i === current));
  cards[current].focus();
}
function setProgress(data) {
  document.getElementById("progress").textContent = data.decided + " of " + data.total + " decided";
}
async function post(url, body) {
  const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) { throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)); }
  return data;
}
function mark(card, decision, reason) {
  card.dataset.decision = decision;
  card.querySelector(".state").textContent = decision + (reason ? " (" + reason + ")" : "");
}
async function decide(card, decision) {
  const reason = decision === "reject" ? card.querySelector(".reason").value : "";
  try {
    const data = await post("api/decisions", {sha256: card.dataset.sha, decision: decision, reason: reason});
    mark(card, decision, reason);
    setProgress(data);
  } catch (error) { show("not saved: " + error.message); }
}
cards.forEach((card, i) => {
  card.addEventListener("focus", () => {
    current = i;
    cards.forEach((c, j) => c.classList.toggle("current", j === i));
  });
  card.querySelector(".approve").addEventListener("click", () => { select(i); decide(card, "approve"); });
  card.querySelector(".reject").addEventListener("click", () => { select(i); decide(card, "reject"); });
});
document.querySelectorAll(".approve-rest").forEach((button) => {
  button.addEventListener("click", async () => {
    const section = button.closest(".group");
    try {
      const data = await post("api/approve-rest", {group: section.dataset.group});
      const approved = new Set(data.approved);
      section.querySelectorAll(".card").forEach((card) => {
        if (approved.has(card.dataset.sha)) mark(card, "approve", "");
      });
      setProgress(data);
    } catch (error) { show("not saved: " + error.message); }
  });
});
document.getElementById("finish").addEventListener("click", async () => {
  try {
    const data = await post("api/finish", {approve_remaining: document.getElementById("approve-remaining").checked,
                                           note: document.getElementById("note").value});
    setProgress(data);
    show(data.message);
    document.body.dataset.finished = data.resumed ? "resumed" : "saved";
  } catch (error) { show("finish failed: " + error.message); }
});
document.addEventListener("keydown", (event) => {
  if (event.target.matches("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  const card = cards[current];
  if (!card) return;
  if (event.key === "a") { decide(card, "approve").then(() => select(current + 1)); }
  else if (event.key === "r") { decide(card, "reject").then(() => select(current + 1)); }
  else if (event.key === "j" || event.key === "ArrowRight" || event.key === "ArrowDown") { select(current + 1); }
  else if (event.key === "k" || event.key === "ArrowLeft" || event.key === "ArrowUp") { select(current - 1); }
  else { return; }
  event.preventDefault();
});
select(0);
</script></body></html>"""


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve app from a daemon thread while the block runs; yield its base URL; stop on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="aidetect-review-page", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ReviewServerError(f"cannot serve the review page on {host}:{port} (port taken or not allowed?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{bound}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve app in the foreground until interrupted (for `aidetect review serve`)."""
    uvicorn.run(app, host=host, port=port, log_level="warning")
