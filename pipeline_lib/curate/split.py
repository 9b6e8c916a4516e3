"""Group-aware, label-stratified, near-duplicate-aware splits that stay put across re-crawls."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.core.catalog import SPLITS, STATUS_OK
from pipeline_lib.core.config import LABELS
from pipeline_lib.core.workspace import Workspace, atomic_write_bytes
from pipeline_lib.curate.dedup import UnionFind

log = logging.getLogger(__name__)

REGISTRY_COLUMNS = ["group", "split", "assigned_at", "registry_version"]


class SplitError(ValueError):
    """The data cannot be split as configured."""


def split_units(catalog: pd.DataFrame) -> dict[str, str]:
    """Map each group to its split unit: groups sharing a duplicate cluster are joined (union-find)."""
    forest = UnionFind()
    for group in catalog["group"].unique():
        forest.find(str(group))
    clustered = catalog[catalog["cluster"] != ""]
    for _, members in clustered.groupby("cluster"):
        groups = sorted(members["group"].astype(str).unique())
        for other in groups[1:]:
            forest.union(groups[0], other)
    return {group: forest.find(group) for group in forest.parent}


def _seeded_rank(unit: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{unit}".encode()).hexdigest()


@dataclass(frozen=True)
class SplitPlan:
    """The catalog with its split column, the registry after assignment, and what moved."""

    catalog: pd.DataFrame
    registry: pd.DataFrame
    new_groups: int


def assign_splits(
    catalog: pd.DataFrame,
    ratios: dict[str, float],
    seed: int,
    registry: pd.DataFrame | None = None,
    registry_version: int = 1,
) -> SplitPlan:
    """Put every unit (joined groups) of usable rows in one split, stratified by label, sticky to the registry.

    1. Units already in the registry keep their split (a unit whose groups disagree takes the split of
       most of its registered images, and the others follow it).
    2. New units go, largest first, to the split with the largest shortfall against the targets of
       their majority label; ties are broken by a seeded hash of the unit, so runs are deterministic.
    """
    if set(ratios) != set(SPLITS):
        raise SplitError(f"split ratios must name {SPLITS}, got {sorted(ratios)}")
    usable_rows = catalog[catalog["status"] == STATUS_OK]
    unit_of = split_units(catalog)
    known = {} if registry is None else dict(zip(registry["group"], registry["split"], strict=True))
    units = usable_rows.assign(unit=usable_rows["group"].map(unit_of))
    sizes = units.groupby(["unit", "label"]).size().unstack(fill_value=0)
    per_label = units["label"].value_counts()
    current = {label: dict.fromkeys(SPLITS, 0.0) for label in per_label.index}
    chosen: dict[str, str] = {}
    for unit, groups in units.groupby("unit")["group"]:
        registered = [known[g] for g in groups if g in known]
        if registered:
            chosen[str(unit)] = max(set(registered), key=registered.count)
    for unit, split in chosen.items():
        for label, n in sizes.loc[unit].items():
            current[label][split] += n
    new_units = [u for u in sizes.index if u not in chosen]
    new_units.sort(key=lambda u: (-int(sizes.loc[u].sum()), _seeded_rank(str(u), seed)))
    for unit in new_units:
        label = sizes.loc[unit].idxmax()
        target = {s: ratios[s] * per_label[label] for s in SPLITS}
        split = max(SPLITS, key=lambda s: (target[s] - current[label][s], ratios[s]))
        chosen[str(unit)] = split
        for lab, n in sizes.loc[unit].items():
            current[lab][split] += n
    return _plan(catalog, unit_of, chosen, known, registry, registry_version)


def _plan(
    catalog: pd.DataFrame,
    unit_of: dict[str, str],
    chosen: dict[str, str],
    known: dict[str, str],
    registry: pd.DataFrame | None,
    registry_version: int,
) -> SplitPlan:
    out = catalog.copy()
    group_split = {group: chosen.get(unit, "") for group, unit in unit_of.items()}
    usable = out["status"] == STATUS_OK
    out["split"] = ""
    out.loc[usable, "split"] = out.loc[usable, "group"].map(group_split).fillna("")
    now = datetime.now(UTC).isoformat()
    new = [
        {"group": g, "split": s, "assigned_at": now, "registry_version": registry_version}
        for g, s in sorted(group_split.items())
        if s and g not in known
    ]
    base = registry if registry is not None else pd.DataFrame(columns=REGISTRY_COLUMNS)
    updated = pd.concat([base, pd.DataFrame(new, columns=REGISTRY_COLUMNS)], ignore_index=True)
    return SplitPlan(out, updated, len(new))


@dataclass(frozen=True)
class RegistryState:
    """The registry to assign against, its version, and what happened to it (for the run's notes)."""

    registry: pd.DataFrame | None
    version: int
    note: str


def _meta_path(workspace: Workspace):
    return workspace.splits / "registry.json"


def read_registry_meta(workspace: Workspace) -> dict | None:
    """The ratios and seed the current registry version was made with, or None for a registry made before."""
    path = _meta_path(workspace)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_registry_meta(workspace: Workspace, version: int, ratios: dict[str, float], seed: int) -> None:
    """Record the registry version with the ratios and seed it follows (atomically)."""
    meta = {"version": version, "ratios": {k: ratios[k] for k in SPLITS}, "seed": seed}
    atomic_write_bytes(_meta_path(workspace), json.dumps(meta, indent=2).encode("utf-8"))


def _changes(meta: dict, ratios: dict[str, float], seed: int) -> list[str]:
    changes = [
        f"split.{name} changed from {meta['ratios'][name]} to {ratios[name]}"
        for name in SPLITS
        if abs(float(meta["ratios"][name]) - ratios[name]) > 1e-9
    ]
    if int(meta["seed"]) != seed:
        changes.append(f"split.seed changed from {meta['seed']} to {seed}")
    return changes


def prepare_registry(workspace: Workspace, ratios: dict[str, float], seed: int, reshuffle: bool) -> RegistryState:
    """The sticky registry to use: the current one, or (with reshuffle) an empty new version, the old one archived.

    Raises SplitError when ratios or seed differ from the registry's and reshuffle was not asked for: sticky
    groups would otherwise silently ignore the new settings.
    """
    registry = read_registry(workspace)
    meta = read_registry_meta(workspace) or {"version": 1, "ratios": ratios, "seed": seed}
    version = int(meta["version"])
    if registry is None:
        return RegistryState(None, version, "")
    if reshuffle:
        archive = workspace.splits / f"registry-v{version}.csv"
        atomic_write_bytes(archive, (workspace.splits / "registry.csv").read_bytes())
        (workspace.splits / "registry.csv").unlink()
        note = f"reshuffled: registry version {version} archived as {archive.name}, now version {version + 1}"
        log.warning(note)
        return RegistryState(None, version + 1, note)
    changes = _changes(meta, ratios, seed)
    if changes:
        raise SplitError(
            f"{'; '.join(changes)} since split registry version {version} was made. Groups already assigned stay "
            f"where they are, so the new values would not apply: run again with --reshuffle to start registry "
            f"version {version + 1} (the test set changes), or restore the old values."
        )
    return RegistryState(registry, version, "")


def registry_version_for(workspace: Workspace, reshuffle: bool) -> int:
    """The registry version a split will use: the current one, or with reshuffle the next one (once one exists).

    The split stage is keyed on this number instead of the --reshuffle flag, so the run after a reshuffle uses the
    same version and comes back Cached, while every new --reshuffle makes a new version.
    """
    meta = read_registry_meta(workspace) or {"version": 1}
    current = int(meta["version"])
    return current + 1 if reshuffle and read_registry(workspace) is not None else current


def largest_groups(catalog: pd.DataFrame, n: int = 5) -> list[dict[str, object]]:
    """The n largest groups of usable, assigned rows: group, label, split, images."""
    rows = catalog[(catalog["status"] == STATUS_OK) & (catalog["split"] != "")]
    sizes = rows.groupby(["group", "label", "split"]).size().rename("images").reset_index()
    return sizes.sort_values(["images", "group"], ascending=[False, True]).head(n).to_dict("records")


def registry_path(workspace: Workspace) -> str:
    return str(workspace.splits / "registry.csv")


def read_registry(workspace: Workspace) -> pd.DataFrame | None:
    """The sticky group -> split registry, or None when no split was made yet."""
    path = workspace.splits / "registry.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"group": str, "split": str}, keep_default_na=False)


def write_registry(workspace: Workspace, registry: pd.DataFrame) -> None:
    """Write the registry atomically."""
    atomic_write_bytes(workspace.splits / "registry.csv", registry.to_csv(index=False).encode("utf-8"))


def split_report(catalog: pd.DataFrame, ratios: dict[str, float], min_groups: int) -> tuple[pd.DataFrame, list[str]]:
    """Images and groups per split and label with the deviation from target, plus warnings.

    share: the label's images in this split / all its images; split_share: the label's share of the split's images
    (the class ratio training and evaluation see).
    """
    rows = catalog[(catalog["status"] == STATUS_OK) & (catalog["split"] != "")]
    table = rows.groupby(["split", "label"]).agg(images=("sha256", "size"), groups=("group", "nunique")).reset_index()
    totals = rows.groupby("label").size()
    table["share"] = table.apply(lambda r: r["images"] / totals[r["label"]], axis=1).round(4)
    table["target"] = table["split"].map(ratios)
    table["deviation"] = (table["share"] - table["target"]).round(4)
    table["split_share"] = (table["images"] / table.groupby("split")["images"].transform("sum")).round(4)
    warnings = []
    for label in sorted(set(LABELS) - set(totals.index)):
        warnings.append(f"label {label} has no usable image: a detector cannot be trained without it")
    for split in SPLITS:
        for label in LABELS:
            match = table[(table["split"] == split) & (table["label"] == label)]
            groups = int(match["groups"].sum()) if len(match) else 0
            if ratios.get(split, 0) > 0 and groups < min_groups:
                warnings.append(f"split {split} has {groups} group(s) of label {label} (minimum {min_groups})")
    return table, warnings


@dataclass(frozen=True)
class LabelShortfall:
    """A label with fewer than the minimum number of groups in some split (groups per split)."""

    label: str
    groups: Mapping[str, int]


def label_shortfalls(
    report: Sequence[Mapping[str, Any]], ratios: Mapping[str, float], min_groups: int
) -> list[LabelShortfall]:
    """The labels with fewer than min_groups groups in a split whose ratio is above 0 (rows of split_report)."""
    groups = {(str(row["split"]), str(row["label"])): int(row["groups"]) for row in report}
    shortfalls = []
    for label in LABELS:
        per_split = {split: groups.get((split, label), 0) for split in SPLITS if ratios.get(split, 0) > 0}
        if any(n < min_groups for n in per_split.values()):
            shortfalls.append(LabelShortfall(label, per_split))
    return shortfalls


def shortfall_message(shortfalls: Sequence[LabelShortfall], folders: Mapping[str, Sequence[Path]], root: Path) -> str:
    """Why training cannot start and how to add images of each short label (its folders, `aidetect import`)."""
    lines = []
    for item in shortfalls:
        counts = ", ".join(f"{n} in {split}" for split, n in item.groups.items())
        where = " or ".join(str(folder) for folder in folders.get(item.label, []))
        fill = f"put {item.label} images into {where} (one sub-folder per group), or " if where else ""
        lines.append(
            f"label {item.label!r} has too few groups ({counts}; split.min_groups_per_label needs each): "
            f"{fill}add a folder with `aidetect import FOLDER --label {item.label} --workspace {root}`"
            + (", or add names to a search source's keywords" if item.label == "real" else "")
        )
    return "; ".join(lines) + ". Then run again. Nothing was trained or registered."


TRAINSET_COLUMNS: tuple[str, ...] = ("sha256", "path", "label", "group", "split", "status")


def training_set(catalog: pd.DataFrame) -> pd.DataFrame:
    """What training depends on, and nothing else: the usable train and val images (sha256, content-addressed
    path, label, group, split), sorted.

    Its digest keys the train stage, so URLs, fetch times, test images or unused rows never retrain a model.
    """
    rows = catalog[(catalog["status"] == STATUS_OK) & catalog["split"].isin(("train", "val"))]
    table = rows[list(TRAINSET_COLUMNS)].drop_duplicates("sha256").astype("string")
    return table.sort_values("sha256").reset_index(drop=True)


def class_ratios(report: pd.DataFrame) -> pd.DataFrame:
    """Per split (train, val, test order): real and ai images and real_per_ai (inf without ai, nan when empty)."""
    counts = report.pivot_table(index="split", columns="label", values="images", aggfunc="sum", fill_value=0)
    counts = counts.reindex(index=[s for s in SPLITS if s in counts.index], columns=["real", "ai"], fill_value=0)
    frame = counts.astype("int64").reset_index()
    frame.columns.name = None
    real, ai = frame["real"].astype(float), frame["ai"].astype(float)
    frame["real_per_ai"] = (real / ai).where(ai > 0, float("inf")).where((real + ai) > 0, float("nan"))
    return frame


def describe_ratios(ratios: pd.DataFrame) -> str:
    """One line for the run's notes, e.g. 'class ratio real:ai per split: train 40:10 (4.00:1), test 9:9 (1.00:1)'."""
    parts = [f"{r.split} {r.real}:{r.ai} ({r.real_per_ai:.2f}:1)" for r in ratios.itertuples()]
    return "class ratio real:ai per split: " + ", ".join(parts)


def check_no_leak(catalog: pd.DataFrame) -> None:
    """Raise SplitError if a group or a duplicate cluster appears in two splits."""
    assigned = catalog[catalog["split"] != ""]
    for column in ("group", "cluster"):
        keyed = assigned[assigned[column] != ""]
        spread = keyed.groupby(column)["split"].nunique()
        leaking = spread[spread > 1]
        if len(leaking):
            raise SplitError(f"{column} {leaking.index[0]!r} appears in {int(leaking.iloc[0])} splits")


def _generators(catalog: pd.DataFrame) -> pd.Series:
    return catalog["generator"].fillna("").astype(str)


def known_generators(catalog: pd.DataFrame) -> list[str]:
    """The generators of usable, assigned AI rows, sorted."""
    usable = (catalog["status"] == STATUS_OK) & (catalog["split"] != "") & (catalog["label"] == "ai")
    return sorted(g for g in _generators(catalog)[usable].unique() if g)


def left_out_images(catalog: pd.DataFrame, generator: str) -> int:
    """How many usable rows of that generator are in the test split."""
    rows = (catalog["status"] == STATUS_OK) & (catalog["split"] == "test") & (_generators(catalog) == generator)
    return int(rows.sum())


def leave_generator_out(catalog: pd.DataFrame, generator: str) -> pd.DataFrame:
    """Move every split unit holding a usable row of that generator to "test" (leave-one-generator-out).

    Whole units move (joined groups, real images with them), so no group or duplicate cluster leaks and no
    row of the generator stays in train or val. Apply it after assign_splits: the result is a per-run view,
    the sticky registry keeps the units' regular splits. Raises SplitError naming the known generators when
    no usable AI row has that generator, or when no AI image would be left to train on.
    """
    known = known_generators(catalog)
    if generator not in known:
        raise SplitError(
            f"split.leave_out_generator {generator!r} matches no usable AI image; "
            f"known generators: {', '.join(known) or 'none'}"
        )
    out = catalog.copy()
    assigned = (out["status"] == STATUS_OK) & (out["split"] != "")
    unit_of = split_units(out)
    units = out["group"].astype(str).map(unit_of)
    moved = set(units[assigned & (_generators(out) == generator)])
    out.loc[assigned & units.isin(moved), "split"] = "test"
    if not ((out["split"] == "train") & (out["label"] == "ai") & assigned).any():
        raise SplitError(
            f"leaving out generator {generator!r} leaves no AI image in train; known generators: {', '.join(known)}"
        )
    log.info("leave-one-generator-out: %s, %d unit(s) moved to test", generator, len(moved))
    return out
