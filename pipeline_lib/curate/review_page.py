"""The review page's HTML and script: the review queue's order (suspects first, reasons and a pre-filled
suggestion beside each image), or one grid per group when there is no queue; every crawled string escaped."""

from __future__ import annotations

import html

import pandas as pd

from pipeline_lib.curate.review import Decision
from pipeline_lib.curate.review_pack import Hint, hints_html, safe_href

REASONS = ("duplicate", "several_people", "unrelated", "wrong_label", "other")


def _suggestion(suggested: dict[str, object] | None) -> str:
    """The queue's view of one image: suspicion, reasons (strongest first) and the suggestion that Enter accepts."""
    if suggested is None:
        return ""
    esc = html.escape
    decision, reason = str(suggested["suggested"]), str(suggested["reject_reason"])
    reasons = "".join(f"<li>{esc(str(text))}</li>" for text in suggested["reasons"])
    what = f"{decision} ({reason})" if reason else decision
    return (
        f"<div class='queue'><span class='suspicion'>suspicion {float(suggested['suspicion']):.2f}</span>"
        f"<ul class='reasons'>{reasons}</ul><span class='suggestion'>suggested: <b>{esc(what)}</b> "
        f"— {esc(str(suggested['why']))} <kbd>Enter</kbd></span></div>"
    )


def _card(
    row: object,
    decided: dict[str, Decision],
    hints: list[Hint],
    members: pd.DataFrame,
    suggested: dict[str, object] | None = None,
) -> str:
    """One image to decide, all crawled text escaped; with the queue's suspicion, reasons and suggestion if given."""
    esc = html.escape
    r = row
    decision = decided.get(r.sha256)
    state = f"{decision.decision} ({decision.reason})" if decision and decision.reason else ""
    state = state or (decision.decision if decision else "")
    url = str(r.url)
    preset = str(suggested["reject_reason"]) if suggested and suggested["reject_reason"] in REASONS else "other"
    options = "".join(f"<option value='{v}'{' selected' if v == preset else ''}>{v}</option>" for v in REASONS)
    queue = (
        f" data-suggested='{esc(str(suggested['suggested']))}' data-suspicion='{float(suggested['suspicion']):.4f}'"
        if suggested
        else ""
    )
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
        f"<figure class='card' tabindex='0' data-sha='{esc(r.sha256)}'{queue} data-decision='"
        f"{esc(decision.decision) if decision else ''}'>"
        f"<img src='thumbs/{esc(r.sha256)}.jpg' alt='image {esc(r.sha256[:12])}'>"
        f"<figcaption><b class='label'>{esc(str(r.label))}</b> · <span class='group'>{esc(str(r.group))}</span>"
        f" · <span class='keyword'>{esc(str(r.keyword))}</span><br>"
        f"<a class='url' href='{esc(safe_href(url))}' rel='noreferrer' target='_blank'>{esc(url[:80])}</a><br>"
        f"{esc(str(r.width))}×{esc(str(r.height))} · <code>{esc(r.sha256[:12])}</code><br>"
        f"{_suggestion(suggested)}{hints_html(hints)}{cluster}</figcaption>"
        f"<div class='actions'><button class='approve' type='button'>approve (a)</button> "
        f"<select class='reason' aria-label='reject reason'>{options}</select> "
        f"<button class='reject' type='button'>reject (r)</button></div>"
        f"<div class='state'>{esc(state)}</div></figure>"
    )


def render_page(
    catalog: pd.DataFrame,
    todo: pd.DataFrame,
    decided: dict[str, Decision],
    hints: dict[str, list[Hint]],
    progress: dict[str, int],
    waiting: bool,
    queue: pd.DataFrame | None = None,
    threshold: float = 0.5,
) -> str:
    """The whole review page: the queue's order (suspects first) when queue rows are given, else one grid per
    group; every crawled string escaped."""
    esc = html.escape
    clusters = {
        key: members.drop_duplicates("sha256") for key, members in catalog[catalog["cluster"] != ""].groupby("cluster")
    }
    if queue is not None:
        body = _queue_sections(todo, decided, hints, clusters, queue, threshold)
    else:
        body = "".join(
            _group_section(str(group), rows, decided, hints, clusters)
            for group, rows in todo.groupby("group", sort=True)
        )
    body = body or "<p id='nothing'>Nothing to review: every image has a decision.</p>"
    run = "A pipeline run waits for this review." if waiting else "No pipeline run waits; decisions are kept."
    below = (
        f"<label>approve every remaining image below suspicion <input id='below' type='number' min='0' max='1' "
        f"step='0.05' value='{threshold:g}'></label> <button id='approve-below' type='button'>approve</button> · "
        if queue is not None
        else ""
    )
    return (
        _PAGE.replace("{{PROGRESS}}", f"{progress['decided']} of {progress['total']} decided")
        .replace("{{RUN}}", esc(run))
        .replace("{{BELOW}}", below)
        .replace("{{BODY}}", body)
    )


def _group_section(
    group: str,
    rows: pd.DataFrame,
    decided: dict[str, Decision],
    hints: dict[str, list[Hint]],
    clusters: dict[str, pd.DataFrame],
) -> str:
    """One group's grid with its 'approve the rest of this group' button (the page without a queue)."""
    esc = html.escape
    labels = ", ".join(sorted(set(rows["label"].astype(str))))
    cards = "".join(
        _card(row, decided, hints.get(row.sha256, []), clusters.get(row.cluster, pd.DataFrame()))
        for row in rows.itertuples()
    )
    return (
        f"<section class='group' data-group='{esc(group)}'><h2><span>{esc(group)}</span> "
        f"<small>({esc(labels)}, {len(rows)})</small></h2>"
        f"<button class='approve-rest' type='button'>approve the rest of this group</button>"
        f"<div class='grid'>{cards}</div></section>"
    )


def _queue_sections(
    todo: pd.DataFrame,
    decided: dict[str, Decision],
    hints: dict[str, list[Hint]],
    clusters: dict[str, pd.DataFrame],
    queue: pd.DataFrame,
    threshold: float,
) -> str:
    """The images in queue order: suspects (suspicion >= threshold) first, then the rest."""
    marks = {str(row["sha256"]): row for row in queue.to_dict("records")}
    images = {str(row.sha256): row for row in todo.itertuples()}
    parts: dict[str, list[str]] = {"suspects": [], "rest": []}
    for sha in [s for s in marks if s in images] + [s for s in images if s not in marks]:
        row, suggested = images[sha], marks.get(sha)
        part = "suspects" if suggested is not None and float(suggested["suspicion"]) >= threshold else "rest"
        members = clusters.get(row.cluster, pd.DataFrame())
        parts[part].append(_card(row, decided, hints.get(sha, []), members, suggested))
    titles = {"suspects": f"Suspects (suspicion ≥ {threshold:g})", "rest": f"Below suspicion {threshold:g}"}
    return "".join(
        f"<section class='queue-part' id='{name}'><h2>{titles[name]} <small>({len(cards)})</small></h2>"
        f"<div class='grid'>{''.join(cards)}</div></section>"
        for name, cards in parts.items()
        if cards
    )


_PAGE = """<!doctype html><html lang='en'><head><meta charset='utf-8'><title>aidetect review</title>
<style>
body{font-family:sans-serif;margin:0}header{position:sticky;top:0;background:#eef;padding:.5em 1em;z-index:2}
main{padding:0 1em}.grid{display:flex;flex-wrap:wrap}.card{width:200px;margin:4px;padding:4px;border:2px solid #ccc;
font-size:11px;word-break:break-all}.card img{max-width:190px}.card:focus,.card.current{outline:3px solid #36f}
.card[data-decision=approve]{border-color:#090;background:#efe}.card[data-decision=reject]{border-color:#c00;
background:#fee}.state{font-weight:bold}.hint{color:#555}.flagged{color:#c00;font-weight:bold}
.cluster img.member{max-width:50px;margin:1px;opacity:.8}.cluster img.keeper{outline:2px solid #090}
#message{font-weight:bold;color:#036}.suspicion{font-weight:bold;font-size:12px}.reasons{margin:2px 0;
padding-left:14px;color:#333}.card[data-suggested=reject] .suspicion{color:#c00}.suggestion b{color:#036}
</style></head><body>
<header><b>aidetect review</b> · <span id='progress'>{{PROGRESS}}</span> · <span id='run'>{{RUN}}</span><br>
keys: <kbd>Enter</kbd> accept the suggestion, <kbd>a</kbd> approve, <kbd>r</kbd> reject (with the card's reason),
<kbd>j</kbd>/<kbd>k</kbd> or arrows next/previous · {{BELOW}}
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
const below = document.getElementById("approve-below");
if (below) {
  below.addEventListener("click", async () => {
    try {
      const data = await post("api/approve-below", {threshold: Number(document.getElementById("below").value)});
      const approved = new Set(data.approved);
      cards.forEach((card) => { if (approved.has(card.dataset.sha)) mark(card, "approve", ""); });
      setProgress(data);
      show(data.approved.length + " image(s) approved");
    } catch (error) { show("not saved: " + error.message); }
  });
}
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
  if (event.key === "Enter" && card.dataset.suggested) {
    decide(card, card.dataset.suggested).then(() => select(current + 1));
  }
  else if (event.key === "a") { decide(card, "approve").then(() => select(current + 1)); }
  else if (event.key === "r") { decide(card, "reject").then(() => select(current + 1)); }
  else if (event.key === "j" || event.key === "ArrowRight" || event.key === "ArrowDown") { select(current + 1); }
  else if (event.key === "k" || event.key === "ArrowLeft" || event.key === "ArrowUp") { select(current - 1); }
  else { return; }
  event.preventDefault();
});
select(0);
</script></body></html>"""
