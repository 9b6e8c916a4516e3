"""The review queue: every pending image with a suspicion score (0..1), its reasons and a suggested decision.

Signals, each used when it is available, each a rough probability that the image does not belong:

1. label: 1 - p(given label) from out-of-sample probabilities (the champion's for images it never trained on, else a
   cross-validated logistic regression on the cached features, review_scorer), ranked with cleanlab's
   `get_label_quality_scores`; cleanlab's `find_label_issues` (confident learning, per-class thresholds) flags
   labels it finds wrong even where the model's probability stays below 0.5.
2. outlier: the distance to the k nearest approved images of the same label (cleanlab's `OutOfDistribution` on
   each block of features), calibrated against the distances new images usually have.
3. near-duplicates (dedup's clusters): of a rejected image, across groups, or the suggested keeper (information).
4. faces (curate.faces: no face, several faces) and tiny images.

They combine as independent chances (noisy-OR): suspicion = 1 - prod(1 - s_i). An image at or above SUGGEST_REJECT
is suggested for rejection with the reason of its strongest signal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores

from pipeline_lib.assess.review_scorer import NO_MODEL, Scorer, cross_validated_p_ai, find_scorer
from pipeline_lib.core.catalog import STATUS_OK
from pipeline_lib.core.config import LABELS
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import faces, review, review_pack
from pipeline_lib.learn import features

log = logging.getLogger(__name__)

SUGGEST_REJECT = 0.5  # suspicion from which the queue suggests a rejection
MIN_REFERENCE = 5  # approved images of a label needed to judge outliers among them
MIN_REASON = 0.05  # an outlier signal weaker than this is no reason
AGREES = 0.9  # the model's p of the given label from which the reason says it agrees (below: unsure)
MIN_LABEL_ISSUES = 10  # scored images per label needed before cleanlab's per-class thresholds mean anything
LABEL_WORDS = {"real": "real photos", "ai": "AI images"}
QUEUE_COLUMNS = ("sha256", "label", "group", "suspicion", "suggested", "reject_reason", "why", "reasons")


@dataclass(frozen=True)
class Signal:
    """One reason to doubt an image: its strength (0 = information only), text and the reject reason it implies."""

    strength: float
    text: str
    reject_reason: str = "other"


@dataclass(frozen=True)
class QueueSettings:
    """How the queue is scored (review config and the device of the model stages)."""

    tiny_side: int = 128
    neighbours: int = 10
    reference_per_label: int = 1000
    count_faces: bool = True
    device: str = "cpu"
    folds: int = 5


@dataclass(frozen=True)
class ReviewQueue:
    """The queue's rows (QUEUE_COLUMNS, most suspect first), who scored it and how many features were computed."""

    rows: pd.DataFrame
    scorer: str = ""  # the model's reviewer name (model:<name>/<version>), "" when no model scored
    note: str = ""  # why no model scored, "" when one did
    computed: int = 0
    reused: int = 0
    sources: tuple[str, ...] = field(default_factory=tuple)


def combine(signals: list[Signal]) -> float:
    """Noisy-OR of the signals' strengths: the chance that at least one of them is right."""
    keep = 1.0
    for signal in signals:
        keep *= 1.0 - min(max(signal.strength, 0.0), 1.0)
    return 1.0 - keep


def label_signals(labels: list[str], p_ai: np.ndarray) -> list[Signal]:
    """Per image: 1 - cleanlab's self-confidence (p of the given label); cleanlab's label issues lifted to 0.5."""
    y = np.array([LABELS.index(label) for label in labels])
    probs = np.column_stack([1.0 - p_ai, p_ai])
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    issues = np.zeros(len(y), dtype=bool)
    if np.bincount(y, minlength=len(LABELS)).min() >= MIN_LABEL_ISSUES:
        issues = find_label_issues(y, probs)
    out = []
    for label, q, p, issue in zip(labels, quality, p_ai, issues, strict=True):
        other = "ai" if label == "real" else "real"
        p_other = float(p) if other == "ai" else 1.0 - float(p)
        if issue or q < 0.5:
            text = f"model says {other} with {p_other:.2f}" + (" (cleanlab: label issue)" if issue else "")
            out.append(Signal(max(1.0 - float(q), 0.5 if issue else 0.0), text, "wrong_label"))
        else:
            verb = "agrees" if q >= AGREES else "is unsure"
            out.append(Signal(1.0 - float(q), f"model {verb}: {label} {float(q):.2f}", "wrong_label"))
    return out


def mean_distances(reference: np.ndarray, queries: np.ndarray | None, neighbours: int) -> np.ndarray:
    """Mean cosine distance of each query (None: each reference vector, itself left out) to its k nearest reference
    vectors.

    The neighbours come from cleanlab's OutOfDistribution (its kNN and its duplicate correction). It reports
    exp(-d / its scaling factor); we read d back (departure: we compare distances across fits to calibrate them,
    its scores alone only rank within one fit). float64, as its exp of float32 features underflows at d > 87 units.
    """
    ood = OutOfDistribution(params={"k": max(1, min(neighbours, len(reference) - 1))})
    fitted = ood.fit_score(features=np.asarray(reference, dtype=np.float64), verbose=False)
    scores = fitted if queries is None else ood.score(features=np.asarray(queries, dtype=np.float64))
    return -np.log(np.clip(scores, 1e-300, 1.0)) * float(ood.params["scaling_factor"])


def usual_distances(reference: np.ndarray, groups: list[str], neighbours: int) -> np.ndarray:
    """How far approved images lie from approved images of other groups (other people, other prompts), as a new
    group's images would: the groups split in two halves, each half measured against the other (every image
    against the others when there is a single group)."""
    names = sorted(set(groups))
    first = np.isin(np.asarray(groups), names[::2])
    if first.all() or (~first).sum() < 2 or first.sum() < 2:
        return mean_distances(reference, None, neighbours)
    return np.concatenate([mean_distances(reference[~part], reference[part], neighbours) for part in (first, ~first)])


def outlier_signals(
    reference: list[np.ndarray], groups: list[str], pending: list[np.ndarray], label: str, neighbours: int
) -> list[Signal | None]:
    """Outlier signals of pending images against the approved images of the same label, one feature block at a
    time (e.g. a classifier's penultimate features and its pooled first stage); the strongest block counts.

    Usual distances: the pending images' own and those of approved images to other groups' (usual_distances); the
    reason says which share of the approved images lies at least as far ("top 3%"). Strength over the usual
    distances' quantiles: 0.95 (1 - exp(-(d - q50) / (2 (q95 - q50)))), so 0 up to the median, 0.37 at the 95th
    percentile, 0.6 one spread beyond it. None for an image below MIN_REASON.
    """
    best = np.zeros(len(pending[0]))
    shares = np.ones(len(pending[0]))
    for ref_block, pending_block in zip(reference, pending, strict=True):
        far = mean_distances(ref_block, pending_block, neighbours)
        approved = usual_distances(ref_block, groups, neighbours)
        q50, q95 = np.quantile(np.concatenate([far, approved]), [0.5, 0.95])
        strength = 0.95 * (1.0 - np.exp(-np.maximum(far - q50, 0.0) / (2.0 * max(float(q95 - q50), 1e-12))))
        share = (approved[None, :] >= far[:, None]).mean(axis=1)
        stronger = strength > best
        best, shares = np.where(stronger, strength, best), np.where(stronger, share, shares)
    words = LABEL_WORDS.get(label, label)
    return [
        Signal(float(strength), f"outlier among {words} ({_rank_text(share)})", "unrelated")
        if strength >= MIN_REASON
        else None
        for strength, share in zip(best, shares, strict=True)
    ]


def _rank_text(share: float) -> str:
    """'top 3%': the share of approved images (to other groups) at least as far; 'beyond every approved one'."""
    if share <= 0:
        return "beyond every approved one"
    percent = share * 100
    return f"top {percent:.0f}%" if percent >= 10 else f"top {percent:.2g}%"


def duplicate_signal(row: pd.Series, members: pd.DataFrame, decisions: Mapping[str, review.Decision]) -> Signal | None:
    """The near-duplicate cluster of a pending image: a rejected twin, another group, or it is the keeper."""
    others = members[members["sha256"] != row["sha256"]].drop_duplicates("sha256")
    if others.empty:
        return None
    for sha in others["sha256"]:
        decision = decisions.get(sha)
        if decision is not None and decision.decision == "reject":
            why = f" ({decision.reason})" if decision.reason else ""
            return Signal(0.9, f"near-duplicate of {sha[:8]}, rejected before{why}", decision.reason or "duplicate")
    elsewhere = others[others["group"].astype(str) != str(row["group"])]
    if not elsewhere.empty:
        first = elsewhere.iloc[0]
        return Signal(0.5, f"near-duplicate of {first['sha256'][:8]} in group {first['group']}", "duplicate")
    if row["cluster"] != row["sha256"]:
        return Signal(0.6, f"near-duplicate of {str(row['cluster'])[:8]} (the suggested keeper)", "duplicate")
    marked = ", ".join(sha[:8] for sha in others["sha256"])
    return Signal(0.0, f"keeper of a near-duplicate cluster ({marked} marked duplicate)")


def face_signal(text: str) -> Signal | None:
    """A face-count hint as a signal: no face (0.25), several faces (0.35); one face is information."""
    if text == faces.UNAVAILABLE:
        return None
    if text == "no face found":
        return Signal(0.25, text, "unrelated")
    if text == "1 face":
        return Signal(0.0, text)
    return Signal(0.35, text, "several_people")


def tiny_signal(width: object, height: object, tiny_side: int) -> Signal | None:
    """tiny: WxH when the shorter side is below tiny_side (0.25)."""
    if pd.isna(width) or pd.isna(height) or min(int(width), int(height)) >= tiny_side:
        return None
    return Signal(0.25, f"tiny: {int(width)}x{int(height)}", "other")


def reference_rows(
    candidates: pd.DataFrame, decisions: Mapping[str, review.Decision], scorer: Scorer, per_label: int
) -> pd.DataFrame:
    """Approved images to compare with, per label: those the model never trained on when there are enough (its own
    training images sit closer together than new ones would), else all; at most per_label, chosen by sha256."""
    approved = candidates[candidates["sha256"].map(lambda s: s in decisions and decisions[s].decision == "approve")]
    parts = []
    for _, rows in approved.groupby("label", sort=True):
        unseen = rows[~rows["sha256"].isin(scorer.trained_on)]
        chosen = unseen if len(unseen) >= MIN_REFERENCE * 4 else rows
        parts.append(chosen.sort_values("sha256").head(per_label))
    return pd.concat(parts) if parts else approved.iloc[0:0]


def _files(workspace: Workspace, rows: pd.DataFrame) -> dict[str, Path]:
    return {str(sha): workspace.root / str(path) for sha, path in zip(rows["sha256"], rows["path"], strict=True)}


@dataclass
class _Scored:
    """The model-based signals of the pending images, by sha256."""

    signals: dict[str, list[Signal]] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0
    sources: list[str] = field(default_factory=list)

    def add(self, sha: str, signal: Signal) -> None:
        self.signals.setdefault(sha, []).append(signal)


def model_signals(
    workspace: Workspace, todo: pd.DataFrame, reference: pd.DataFrame, scorer: Scorer, settings: QueueSettings
) -> _Scored:
    """Label and outlier signals of todo's images from the scorer's (cached) features."""
    scored = _Scored()
    both = pd.concat([todo, reference[~reference["sha256"].isin(todo["sha256"])]]).drop_duplicates("sha256")
    extractor = scorer.extractor
    embedded = features.embed(workspace, extractor, _files(workspace, both), settings.device)
    scored.computed, scored.reused = embedded.computed, embedded.reused
    blocks = {
        name: pd.DataFrame(embedded.matrix[:, columns], index=list(embedded.shas))
        for name, columns in extractor.block_slices().items()
    }
    head = blocks.get(features.PENULTIMATE, pd.DataFrame(embedded.matrix, index=list(embedded.shas)))
    p_ai = _label_probabilities(todo, reference, head, scorer, settings, scored)
    labelled = todo[p_ai.notna().to_numpy()]
    for sha, signal in zip(
        labelled["sha256"], label_signals(list(labelled["label"]), p_ai.dropna().to_numpy()), strict=True
    ):
        scored.add(sha, signal)
    for label, rows in todo.groupby("label", sort=True):
        ref = reference[reference["label"] == label]
        if len(ref) < MIN_REFERENCE:
            log.info("review queue: %d approved %s image(s), too few to judge outliers", len(ref), label)
            continue
        signals = outlier_signals(
            [block.loc[ref["sha256"]].to_numpy() for block in blocks.values()],
            list(ref["group"].astype(str)),
            [block.loc[rows["sha256"]].to_numpy() for block in blocks.values()],
            str(label),
            settings.neighbours,
        )
        for sha, signal in zip(rows["sha256"], signals, strict=True):
            if signal is not None:
                scored.add(sha, signal)
        scored.sources.append(f"outlier:{label}")
    return scored


def _label_probabilities(
    todo: pd.DataFrame,
    reference: pd.DataFrame,
    matrix: pd.DataFrame,
    scorer: Scorer,
    settings: QueueSettings,
    scored: _Scored,
) -> pd.Series:
    """p_ai per todo image (NaN where none is available): the champion's where out of sample, else cross-validated.

    matrix: the penultimate features by sha256 (what the scorer's head reads; the whole vector when the extractor
    names no penultimate block)."""
    p_ai = pd.Series(np.nan, index=todo.index, dtype="float64")
    own = ~todo["sha256"].isin(scorer.trained_on) & scorer.own_predictions
    if scorer.p_ai is not None and own.any():
        p_ai[own] = scorer.p_ai(matrix.loc[todo.loc[own, "sha256"]].to_numpy())
        scored.sources.append("champion")
    rest = todo[~own]
    if rest.empty:
        return p_ai
    pool = pd.concat([reference[~reference["sha256"].isin(rest["sha256"])], rest])
    cv = cross_validated_p_ai(
        matrix.loc[pool["sha256"]].to_numpy(), list(pool["label"]), list(pool["group"].astype(str)), settings.folds
    )
    if cv is None:
        log.info("review queue: too few images of a label for cross-validated label checks")
        return p_ai
    p_ai[~own] = cv[len(pool) - len(rest) :]
    scored.sources.append("cross-validation")
    return p_ai


def hint_signals(
    workspace: Workspace,
    catalog: pd.DataFrame,
    todo: pd.DataFrame,
    decisions: Mapping[str, review.Decision],
    settings: QueueSettings,
) -> dict[str, list[Signal]]:
    """Near-duplicate, face and tiny signals per sha256 of todo's images."""
    out: dict[str, list[Signal]] = {}
    clusters = {key: rows for key, rows in catalog[catalog["cluster"] != ""].groupby("cluster", sort=False)}
    face_texts = review_pack.face_hints(workspace, todo) if settings.count_faces else {}
    for _, row in todo.iterrows():
        found = [
            duplicate_signal(row, clusters[row["cluster"]], decisions) if row["cluster"] in clusters else None,
            face_signal(face_texts[row["sha256"]].text) if row["sha256"] in face_texts else None,
            tiny_signal(row["width"], row["height"], settings.tiny_side),
        ]
        out[row["sha256"]] = [signal for signal in found if signal is not None]
    return out


def queue_row(row: pd.Series, signals: list[Signal]) -> dict[str, object]:
    """One queue row: suspicion, reasons (strongest first), suggestion and why."""
    ordered = sorted(signals, key=lambda signal: -signal.strength)
    suspicion = combine(ordered)
    top = ordered[0] if ordered else None
    reject = suspicion >= SUGGEST_REJECT and top is not None
    if reject:
        why = top.text
    elif top is None:
        why = "nothing against it"
    else:
        why = f"suspicion {suspicion:.2f}, below {SUGGEST_REJECT:g} (strongest: {top.text})"
    return {
        "sha256": str(row["sha256"]),
        "label": str(row["label"]),
        "group": str(row["group"]),
        "suspicion": round(suspicion, 4),
        "suggested": "reject" if reject else "approve",
        "reject_reason": top.reject_reason if reject else "",
        "why": why,
        "reasons": [signal.text for signal in ordered],
    }


def build_queue(
    workspace: Workspace,
    catalog: pd.DataFrame,
    decisions: Mapping[str, review.Decision],
    scorer: Scorer | None,
    settings: QueueSettings | None = None,
    why_no_model: str = NO_MODEL,
) -> ReviewQueue:
    """The queue of the undecided images of catalog (dedup snapshot), most suspect first."""
    settings = settings or QueueSettings()
    todo = review.undecided(catalog, dict(decisions))
    if todo.empty:
        return ReviewQueue(pd.DataFrame(columns=list(QUEUE_COLUMNS)), scorer.reviewer if scorer else "", "")
    hints = hint_signals(workspace, catalog, todo, decisions, settings)
    scored = _Scored()
    if scorer is not None:
        candidates = catalog[catalog["status"] == STATUS_OK].drop_duplicates("sha256")
        reference = reference_rows(candidates, decisions, scorer, settings.reference_per_label)
        scored = model_signals(workspace, todo, reference, scorer, settings)
    rows = [queue_row(row, hints[row["sha256"]] + scored.signals.get(row["sha256"], [])) for _, row in todo.iterrows()]
    table = pd.DataFrame(rows, columns=list(QUEUE_COLUMNS))
    table = table.sort_values(["suspicion", "group", "sha256"], ascending=[False, True, True], kind="stable")
    log.info(
        "review queue: %d image(s), %d at or above %g; model %s; features %d computed, %d reused",
        len(table),
        int((table["suspicion"] >= SUGGEST_REJECT).sum()),
        SUGGEST_REJECT,
        scorer.name if scorer else "none",
        scored.computed,
        scored.reused,
    )
    return ReviewQueue(
        table.reset_index(drop=True),
        scorer.reviewer if scorer else "",
        "" if scorer else why_no_model,
        scored.computed,
        scored.reused,
        tuple(scored.sources),
    )


def score_queue(
    workspace: Workspace,
    catalog: pd.DataFrame,
    uri: str,
    registered_model: str,
    settings: QueueSettings | None = None,
    trust_pickle: bool = False,
) -> ReviewQueue:
    """The queue of catalog's undecided images scored by the champion of registered_model in uri, else by the newest
    trained model of the workspace, else by the hints alone (the queue's note says why)."""
    decisions = review.read_decisions(workspace)
    scorer, why = None, ""
    if not review.undecided(catalog, decisions).empty:
        scorer, why = find_scorer(workspace, uri, registered_model, trust_pickle)
    return build_queue(workspace, catalog, decisions, scorer, settings, why)


def queue_lines(queue: ReviewQueue, threshold: float) -> list[str]:
    """The queue for a terminal: one line per image (suspicion, sha256, label, group, suggestion, reasons)."""
    lead = f"scored by {queue.scorer}" if queue.scorer else f"no model: {queue.note}"
    suspects = int((queue.rows["suspicion"] >= threshold).sum())
    lines = [f"{len(queue.rows)} image(s) to review, {suspects} at or above suspicion {threshold:g} ({lead})"]
    for row in queue.rows.itertuples():
        suggestion = f"{row.suggested} ({row.reject_reason})" if row.reject_reason else str(row.suggested)
        lines.append(
            f"{row.suspicion:.2f}  {row.sha256}  {row.label:<4}  {row.group}  -> {suggestion}: {row.why}"
            + (f"  [{'; '.join(row.reasons)}]" if len(row.reasons) else "")
        )
    return lines
