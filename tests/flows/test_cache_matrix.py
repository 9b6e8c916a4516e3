"""What makes a stage run again: one change at a time on a finished run, and the exact stages that recompute.

Real Prefect (the harness), MLflow on SQLite in tmp_path, icrawler against a loopback site; tiny data and a tiny
model (resnet18 from scratch at 32 px, one epoch) so that the whole matrix takes a few minutes on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from flows.pipeline import pipeline
from pipeline_lib.acquire.imports import add_import
from pipeline_lib.assess import comparison
from pipeline_lib.core.catalog import read_snapshot
from pipeline_lib.core.config import FolderSource, PipelineConfig
from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping
from pipeline_lib.core.tracking.runs import Tracker, recent_runs, run_catalog, run_summary
from pipeline_lib.core.tracking.stage_runs import stage_runs
from pipeline_lib.core.tracking.store import tracking_uri
from pipeline_lib.core.tracking.versions import CHAMPION, current_champion
from pipeline_lib.core.workspace import Workspace, file_sha256
from pipeline_lib.curate import review
from pipeline_lib.learn import features, preprocess
from pipeline_lib.ops import caches, demo_data
from pipeline_lib.ops.status import latest_snapshot, workspace_status
from tests import checkout_lock
from tests.conftest import make_image

# One worker builds the matrix (a module fixture) and runs every test of it (tests/conftest.py: ONE_WORKER_MODULES);
# each code edit waits for the tests that run in other processes, and holds new ones back until the file is restored.
pytestmark = [pytest.mark.slow, pytest.mark.edits_checkout]
log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "configs" / "demo.yaml"
DEDUP_SOURCE = REPO / "pipeline_lib" / "curate" / "dedup.py"
STAGES = ("crawl", "ingest", "fingerprint", "dedup", "review", "split", "preprocess", "train", "evaluate", "report")
ALL = set(STAGES)
IMAGE_SIZE = 16
TINY = [
    f"train.image_size={IMAGE_SIZE}",
    "train.epochs=1",
    "train.head_only_epochs=0",
    "train.batch_size=64",
    "evaluate.bootstrap=0",
    "report.images_per_cell=1",
    "audit.enabled=false",
    "split.min_groups_per_label=1",
    "sources.recrawl_after_hours=20",
    "tracking.system_metrics_interval_s=0",
    "report.generalization.mode=off",  # two generators: its stage would join every row's set (tests/flows/test_compare)
]


@dataclass
class World:
    """The files the config names, the loopback site and the workspace of the matrix."""

    root: Path
    data: demo_data.DemoDataset
    keywords: Path
    url_list: Path
    imported: Path
    endpoint: str = ""

    @property
    def ws(self) -> Path:
        return self.root / "ws"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def config(self, overrides: list[str]) -> PipelineConfig:
        """The demo config with a keyword file and a URL list, tiny settings, then overrides."""
        demo = demo_data.demo_config_dict(self.data, self.endpoint, self.ws)
        data = merge_mappings(read_yaml_mapping(DEMO_YAML), demo)
        search = data["sources"]["search"][0] | {"keywords": [], "keywords_file": str(self.keywords)}
        sources = data["sources"] | {"search": [search], "urls": [{"csv": str(self.url_list)}]}
        data = merge_mappings(data, {"sources": sources, "tracking": {"uri": self.tracking_uri}})
        return build_config(data, TINY + overrides, origin="matrix")

    def listed_url(self, name: str) -> str:
        return self.endpoint.split("/images/")[0] + f"/img/listed/{name}"


def _world(root: Path) -> World:
    data = demo_data.generate_demo_dataset(root / "data", n_persons_per_class=4, image_size=64, seed=5)
    world = World(root, data, root / "keywords.txt", root / "urls.csv", root / "imported")
    world.keywords.write_text("\n".join(data.keywords[:3]) + "\n", encoding="utf-8")  # person-04 comes later
    for index in range(3):  # served by the site, reachable only through the URL list
        make_image(data.site_dir / "listed" / f"{index}.jpg", seed=700 + index, size=(64, 64))
    for number, group in enumerate(("other-01", "other-02")):
        for index in range(2):
            image = world.imported / group / f"{index}.png"
            make_image(image, seed=800 + 10 * number + index, size=(56, 56), fmt="PNG")
    add_import(Workspace.create(world.ws), FolderSource(path=world.imported, label="ai", generator="other"))
    return world


def _add_keyword(world: World) -> None:
    world.keywords.write_text("\n".join(world.data.keywords) + "\n", encoding="utf-8")


def _add_url(world: World) -> None:
    with world.url_list.open("a", encoding="utf-8") as handle:
        handle.write(f"{world.listed_url('2.jpg')},real,listed-02\n")


def _add_imported_image(world: World) -> None:
    make_image(world.imported / "other-03" / "0.png", seed=4242, size=(40, 40), fmt="PNG")  # below min_side 48


def _reject_one_test_image(world: World) -> None:
    workspace = Workspace.open(world.ws)
    split = read_snapshot(workspace, workspace.ref(latest_snapshot(workspace, "split")))
    test = split[(split["split"] == "test") & (split["status"] == "ok")]
    review.append_decisions(workspace, [review.Decision(sorted(test["sha256"])[0], "reject", "unrelated", "tester")])


PROBE = "cache matrix probe"  # in every edit, so that an edit left behind by a killed run is found


@dataclass(frozen=True)
class Edit:
    """A real change to a file of the checkout, undone after the run: old replaced by new (old "" appends new); the
    module (if named) is reloaded both ways, so that this process runs the code on disk."""

    path: str
    old: str
    new: str
    module: str = ""


@contextlib.contextmanager
def _edited(edit: Edit) -> Iterator[None]:
    """The checkout edited while no other test runs in any process (tests/checkout_lock.py), then restored."""
    with checkout_lock.editing():
        yield from _edited_here(edit)


def _edited_here(edit: Edit) -> Iterator[None]:
    path = REPO / edit.path
    original = path.read_bytes()
    text = original.decode("utf-8")
    assert PROBE not in text, f"{edit.path} still holds an edit of an earlier, killed matrix run: git checkout it"
    assert edit.old == "" or text.count(edit.old) == 1, f"{edit.path} no longer holds {edit.old!r} once"
    path.write_text(text.replace(edit.old, edit.new) if edit.old else text + edit.new, encoding="utf-8")
    try:
        _reload(edit.module)
        yield
    finally:
        path.write_bytes(original)
        _reload(edit.module)


def _reload(module: str) -> None:
    if module:
        importlib.reload(importlib.import_module(module))


DEDUP_EDIT = Edit(DEDUP_SOURCE.relative_to(REPO).as_posix(), "", f"\n_CACHE_MATRIX_PROBE = 1  # {PROBE}\n")
TEMPLATE_EDIT = Edit("pipeline_lib/assess/templates/report.html", "<body>", f"<body>\n<!-- {PROBE} -->")
ANNOTATION_EDIT = Edit(
    "pipeline_lib/learn/augment.py",
    "def _column(params: torch.Tensor, name: str) -> torch.Tensor:",
    f'def _column(params: "torch.Tensor", name: object) -> "torch.Tensor":  # {PROBE}',
)
RESIZE_EDIT = Edit(
    "pipeline_lib/learn/preprocess.py",
    "(new_w, new_h), Image.Resampling.BILINEAR)",
    f"(new_w, new_h), Image.Resampling.NEAREST)  # {PROBE}",
    module="pipeline_lib.learn.preprocess",
)
# Every bit of the phash inverted: every value changes, Hamming distances (so the clusters) stay as they were.
HASH_EDIT = Edit(
    "pipeline_lib/acquire/hashing.py",
    "return low > np.median(low)",
    f"return low <= np.median(low)  # {PROBE}",
    module="pipeline_lib.acquire.hashing",
)


@dataclass(frozen=True)
class Change:
    """One row: what changes, the overrides kept from then on, those of this run only, and what recomputes."""

    name: str
    completed: set[str]
    edit: Callable[[World], None] | None = None
    overrides: tuple[str, ...] = ()
    once: tuple[str, ...] = ()
    code: Edit | None = None


# One change at a time, each on top of the run before. Listed: the stages that come back Completed; every other
# stage comes back Cached. The crawl runs whenever a run asks for crawling; its log decides what is fetched.
MATRIX: tuple[Change, ...] = (
    Change("no change at all: the crawl finds nothing new, nothing is rewritten", {"crawl"}),
    Change("a name added to the keyword file", ALL, edit=_add_keyword),
    Change(
        "a line added to the URL list: its new group lands in test, the train and val images are unchanged",
        ALL - {"train"},
        edit=_add_url,
    ),
    Change("an image added to an imported folder: its new group lands in val", ALL, edit=_add_imported_image),
    Change(
        "ingest.min_side 32 -> 48: that 40 px image is judged again and quarantined, so the train and val images are "
        "those of the keyword row again, whose model is cached",
        ALL - {"train"},
        overrides=("ingest.min_side=48",),
    ),
    Change("dedup.threshold 6 -> 5: the same clusters", {"crawl", "dedup"}, overrides=("dedup.threshold=5",)),
    Change(
        "one review decision: a test image rejected (the training data is unchanged)",
        {"crawl", "review", "split", "preprocess", "evaluate", "report"},
        edit=_reject_one_test_image,
    ),
    Change(
        "split ratios with --reshuffle",
        {"crawl", "split", "preprocess", "train", "evaluate", "report"},
        overrides=("split.train=0.5", "split.val=0.25", "split.test=0.25"),
        once=("execution.reshuffle_splits=true",),
    ),
    Change(
        "--promote on the next run: the cached model of the reshuffled split takes the champion alias",
        {"crawl"},
        once=("execution.promote=true",),
    ),
    Change("train.lr", {"crawl", "train", "evaluate", "report"}, overrides=("train.lr=0.01",)),
    Change("evaluate.threshold", {"crawl", "evaluate", "report"}, overrides=("evaluate.threshold=0.6",)),
    Change(
        "report.cam_method (evaluate measures the CAM attention too)",
        {"crawl", "evaluate", "report"},
        overrides=("report.cam_method=gradcam++",),
    ),
    Change("the code of pipeline_lib/curate/dedup.py (split imports it)", {"crawl", "dedup", "split"}, code=DEDUP_EDIT),
    Change("a line of the report's HTML template", {"crawl", "report"}, code=TEMPLATE_EDIT),
    Change("an annotation in pipeline_lib/learn/augment.py (train reaches it)", {"crawl"}, code=ANNOTATION_EDIT),
    Change(
        "_resize_crop resizes with NEAREST: every tensor is decoded again, into a new folder, and trained on (split's "
        "shortcut audit reads the files as preprocess normalises them, so it reaches preprocess too)",
        {"crawl", "split", "preprocess", "train", "evaluate", "report"},
        code=RESIZE_EDIT,
    ),
    Change(
        "split.leave_out_generator=other, this run only",
        {"crawl", "split", "preprocess", "train", "evaluate", "report"},
        once=("split.leave_out_generator=other",),
    ),
    Change(
        "a real change of the perceptual hash: every phash is computed again, dedup onward run on them; the training "
        "set (its images and labels) is the same, so its model is cached",
        ALL - {"train"},
        code=HASH_EDIT,
    ),
    Change("--refresh-cache", ALL, once=("execution.refresh_cache=true",)),
)


RUN_RECORDS = (".aidetect.lock", "runs.jsonl")  # every run says who runs (the lock) and adds its line to the list


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file in the workspace but MLflow's artifacts and the run records (each run writes
    its own)."""
    return {
        relative: (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
        and not (relative := path.relative_to(root).as_posix()).startswith("mlartifacts/")
        and relative not in RUN_RECORDS
    }


def _aliases(world: World) -> dict[str, tuple[str, dict[str, str]]]:
    """alias -> (version, its tags) in the registry."""
    found = {}
    for alias in (CHAMPION, "loo-other"):
        version = current_champion(world.tracking_uri, "aidetect", alias)
        if version is not None:
            found[alias] = (str(version.version), dict(version.tags))
    return found


@dataclass
class Row:
    """What one run of the matrix returned and left behind."""

    change: Change
    summary: dict[str, Any]
    run: dict[str, Any]  # run_summary of its MLflow run
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    aliases_before: dict[str, tuple[str, dict[str, str]]]
    aliases_after: dict[str, tuple[str, dict[str, str]]]


@pytest.fixture(scope="module")
def matrix(harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A finished run, then every change of MATRIX in turn (torch on one thread: two busy cores are slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("matrix")
    try:
        yield _run_matrix(_world(folder))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(folder, ignore_errors=True)  # a dozen ResNet50 checkpoints: about 1.4 GB


def _run_matrix(world: World) -> dict[str, Any]:
    dedup_source = file_sha256(DEDUP_SOURCE)
    rows: dict[str, Row] = {}
    overrides: list[str] = []
    with demo_data.search_site(world.data) as endpoint:
        world.endpoint = endpoint
        lines = [f"{world.listed_url(name)},real,listed-01" for name in ("0.jpg", "1.jpg")]
        world.url_list.write_text("url,label,group\n" + "\n".join(lines) + "\n", encoding="utf-8")
        base = pipeline(world.config(overrides))
        for change in MATRIX:
            if change.edit is not None:
                change.edit(world)
            overrides += change.overrides
            before, aliases = _stamps(world.ws), _aliases(world)
            with _edited(change.code) if change.code is not None else contextlib.nullcontext():
                summary = pipeline(world.config([*overrides, *change.once]))
            run = run_summary(world.tracking_uri, summary["mlflow_run_id"])
            rows[change.name] = Row(change, summary, run, before, _stamps(world.ws), aliases, _aliases(world))
            log.info("cache matrix row took %.1f s: %s", summary["seconds"], change.name)
    return {"world": world, "base": base, "rows": rows, "dedup_source": dedup_source, "overrides": overrides}


def _row(matrix: dict[str, Any], start: str) -> Row:
    return next(row for name, row in matrix["rows"].items() if name.startswith(start))


def _split_catalog(matrix: dict[str, Any], row: Row) -> pd.DataFrame:
    workspace = Workspace.open(matrix["world"].ws)
    path = row.run["tags"]["aidetect.catalog"]
    return read_snapshot(workspace, workspace.ref(workspace.root / path))


def test_invalidation_matrix(matrix: dict[str, Any]) -> None:
    assert matrix["base"]["states"] == dict.fromkeys(STAGES, "Completed"), matrix["base"]["states"]
    wrong = []
    for name, row in matrix["rows"].items():
        expected = {stage: "Completed" if stage in row.change.completed else "Cached" for stage in STAGES}
        if row.summary["states"] != expected:
            differs = {stage: state for stage, state in row.summary["states"].items() if state != expected.get(stage)}
            wrong.append(f"{name}: expected Completed {sorted(row.change.completed)}; differs: {differs}")
    assert not wrong, "\n".join(wrong)
    assert file_sha256(DEDUP_SOURCE) == matrix["dedup_source"], "pipeline_lib/curate/dedup.py was not restored"


def test_a_run_without_changes_rewrites_nothing(matrix: dict[str, Any]) -> None:
    row = _row(matrix, "no change")
    changed = sorted(path for path in set(row.before) | set(row.after) if row.before.get(path) != row.after.get(path))
    assert not changed, f"a run that found nothing new wrote: {changed}"


def test_a_new_ingest_policy_judges_seen_files_again(matrix: dict[str, Any]) -> None:
    statuses = {}
    for start in ("an image added", "ingest.min_side"):
        catalog = _split_catalog(matrix, _row(matrix, start))
        statuses[start] = set(catalog[catalog["group"] == "other-03"]["status"])
    assert statuses == {"an image added": {"ok"}, "ingest.min_side": {"invalid:too_small"}}, statuses


def test_training_is_keyed_by_the_content_of_its_images(matrix: dict[str, Any]) -> None:
    models = {start: _row(matrix, start).summary["model"] for start in ("a name", "a line", "an image", "ingest")}
    assert models["a name"] == models["a line"] == models["ingest"] != models["an image"], models
    groups = {}
    for start, group in (("a line", "listed-02"), ("an image", "other-03")):
        catalog = _split_catalog(matrix, _row(matrix, start))
        groups[group] = set(catalog[catalog["group"] == group]["split"])
    assert groups == {"listed-02": {"test"}, "other-03": {"val"}}, groups


def _stage_run(matrix: dict[str, Any], start: str, stage: str) -> dict[str, Any]:
    """run_summary of one stage's nested run in one row's pipeline run."""
    uri = matrix["world"].tracking_uri
    children = stage_runs(Tracker(uri, _row(matrix, start).summary["mlflow_run_id"]))
    return run_summary(uri, children[stage]["run_id"])


def test_the_parts_that_changed_are_logged_on_the_stage_run(matrix: dict[str, Any]) -> None:
    expected = {
        ("train.lr", "train"): "input.config",
        ("evaluate.threshold", "evaluate"): "input.config",
        ("the code of pipeline_lib/curate/dedup.py", "dedup"): "code.pipeline_lib.curate.dedup",
        ("the code of pipeline_lib/curate/dedup.py", "split"): "code.pipeline_lib.curate.dedup",  # split imports dedup
        ("a name added", "crawl"): "file.search.0.keywords_file",
        ("a line of the report's HTML template", "report"): "data.pipeline_lib/assess/templates/report.html",
        ("_resize_crop resizes with NEAREST", "preprocess"): "code.pipeline_lib.learn.preprocess",
    }
    for (start, stage), part in expected.items():
        child = _stage_run(matrix, start, stage)
        assert child["tags"]["aidetect.key_changed"] == part, (start, stage, child["tags"]["aidetect.key_changed"])
        assert child["params"][f"key.{part}"] and "key.code.task" in child["params"], sorted(child["params"])
    train = _stage_run(matrix, "train.lr", "train")
    folder = Path(_row(matrix, "train.lr").summary["model"]).parent.name
    assert train["tags"]["aidetect.cache_key"][:16] == folder, "the logged key is not the key Prefect used"
    assert {"key.lib.torch", "key.code.pipeline_lib.learn.train", "key.input.trainset"} <= set(train["params"])
    uri, row = matrix["world"].tracking_uri, _row(matrix, "no change")
    nested = stage_runs(Tracker(uri, row.summary["mlflow_run_id"]))
    assert nested == {}, f"cached stages and a crawl that found nothing new get no nested run: {sorted(nested)}"
    assert row.run["tags"]["aidetect.stage.crawl.unchanged"] == "true", row.run["tags"]


def _changed(row: Row, prefix: str) -> tuple[set[str], set[str]]:
    """(files under prefix that the row's run added, those it rewrote)."""
    after = {path for path in row.after if path.startswith(prefix)}
    return after - set(row.before), {path for path in after & set(row.before) if row.before[path] != row.after[path]}


def _ok_images(catalog: pd.DataFrame) -> pd.DataFrame:
    return catalog[catalog["status"] == "ok"].drop_duplicates("sha256").set_index("sha256")


def test_a_hashing_change_recomputes_every_phash_and_dedup_onward(matrix: dict[str, Any]) -> None:
    before = _ok_images(_split_catalog(matrix, _row(matrix, "_resize_crop")))
    row = _row(matrix, "a real change of the perceptual hash")
    after = _ok_images(_split_catalog(matrix, row))
    assert set(after.index) == set(before.index) and len(after) > 20, len(after)
    same = [sha[:12] for sha in after.index if after.loc[sha, "phash"] == before.loc[sha, "phash"]]
    assert not same, f"{len(same)} of {len(after)} phash values are the old code's: {same[:5]}"
    assert (after["dhash"] == before["dhash"].reindex(after.index)).all(), "dhash code did not change"
    added, rewritten = _changed(row, "cache/hashes/")
    assert len(added) == 1 and not rewritten, (added, rewritten)  # a new cache; the old code's is left as it was


def test_a_decoding_change_writes_every_tensor_again_and_retrains(matrix: dict[str, Any]) -> None:
    previous, row = _row(matrix, "an annotation"), _row(matrix, "_resize_crop")
    added, rewritten = _changed(row, "cache/tensors/")
    split = _split_catalog(matrix, row)
    n_split = split[(split["status"] == "ok") & (split["split"] != "")]["sha256"].nunique()
    assert len(added) == n_split and not rewritten, (len(added), n_split, sorted(rewritten)[:3])
    assert len({Path(path).parts[2] for path in added}) == 1, "one new folder, named by the new decoding code"
    old = matrix["world"].ws / "cache" / "tensors" / preprocess.cache_folder_name(IMAGE_SIZE)  # restored code
    new = [matrix["world"].ws / path for path in added]
    differ = sum(not np.array_equal(np.load(path), np.load(old.joinpath(*path.parts[-2:]))) for path in new)
    assert differ > 0, "NEAREST and BILINEAR tensors are the same: the edit did not run"
    assert row.summary["model"] != previous.summary["model"], "train ran on the old tensors' key"


def test_a_template_edit_renders_the_report_again(matrix: dict[str, Any]) -> None:
    row = _row(matrix, "a line of the report's HTML template")
    page = Path(row.summary["report"]).read_text(encoding="utf-8")
    assert PROBE in page, "the report was not rendered with the edited template"
    later = Path(_row(matrix, "an annotation").summary["report"]).read_text(encoding="utf-8")
    assert PROBE not in later, "the template was restored: the cached report of before must come back"


def test_refresh_cache_makes_every_per_image_cache_entry_again(matrix: dict[str, Any]) -> None:
    """The validation records, the hashes and the tensors the run reads are all written again (the review's face
    hints and thumbnails too, but an auto review makes none; nor does it score a review queue, and fine-tuning embeds
    nothing, so no run of the matrix makes cache/features: dropped, it must stay empty)."""
    refresh, world = _row(matrix, "--refresh-cache"), matrix["world"]
    workspace, config = Workspace.open(world.ws), world.config(matrix["overrides"])
    unread = {workspace.relative(features.features_root(workspace))}
    for path in caches.data_caches(workspace, config) + caches.model_caches(workspace, config):
        location = workspace.relative(path)
        entries = {name for name in refresh.after if name == location or name.startswith(location + "/")}
        assert entries or not location.startswith("cache/") or location in unread, f"{location} was not made again"
        kept = sorted(name for name in entries if refresh.before.get(name) == refresh.after[name])
        assert not kept, f"--refresh-cache kept {len(kept)} of {len(entries)} entries of {location}: {kept[:3]}"


def test_refresh_cache_trains_the_same_key_again_from_epoch_0(matrix: dict[str, Any]) -> None:
    lr, refresh = _row(matrix, "train.lr"), _row(matrix, "--refresh-cache")
    model = Path(refresh.summary["model"])
    assert model == Path(lr.summary["model"]), "the same content must give the same models/<stage key>/ folder"
    relative = model.relative_to(matrix["world"].ws).as_posix()
    assert refresh.before[relative] != refresh.after[relative], "best.pt was returned as it was, not retrained"
    assert "train.resumed_from_epoch" not in refresh.run["metrics"], "a refreshed run resumed from last.pt"
    assert refresh.run["metrics"]["train.best_epoch"] == 1


def test_a_champion_that_trained_on_the_test_images_is_not_comparable(matrix: dict[str, Any]) -> None:
    row = _row(matrix, "split ratios with --reshuffle")
    champion_version, _ = row.aliases_before[CHAMPION]
    registry = row.summary["registry"]
    test = _split_catalog(matrix, row)
    test_images = set(test[(test["split"] == "test") & (test["status"] == "ok")]["sha256"])
    uri = matrix["world"].tracking_uri
    champion_run = MlflowClient(tracking_uri=uri).get_model_version("aidetect", champion_version).run_id
    trained_on = comparison.seen_in_training(run_catalog(uri, champion_run))
    assert test_images & trained_on, "the reshuffle must put images the champion trained on into test"
    assert registry["comparable"] is False and registry["promoted"] is False, registry
    assert "not comparable" in registry["reason"] and "--promote" in registry["reason"], registry["reason"]
    assert row.aliases_after[CHAMPION] == row.aliases_before[CHAMPION], "the champion moved"
    assert row.run["tags"]["aidetect.champion_comparable"] == "false"
    assert champion_version == row.aliases_after[CHAMPION][0]


def test_promote_on_a_later_run_promotes_the_registered_version_of_the_cached_model(matrix: dict[str, Any]) -> None:
    reshuffled, row = _row(matrix, "split ratios with --reshuffle"), _row(matrix, "--promote on the next run")
    version = reshuffled.summary["registry"]["version"]
    registry = row.summary["registry"]
    assert registry["reused"] and registry["promoted"] and registry["version"] == version, registry
    assert row.aliases_before[CHAMPION][0] != version and row.aliases_after[CHAMPION][0] == version, row.aliases_after


def test_leave_one_generator_out_gets_its_own_alias_and_leaves_the_champion(matrix: dict[str, Any]) -> None:
    row = _row(matrix, "split.leave_out_generator")
    assert row.summary["registry"]["alias"] == "loo-other" and row.summary["registry"]["promoted"], row.summary
    assert row.aliases_after["loo-other"][0] == row.summary["registry"]["version"]
    assert row.aliases_after[CHAMPION] == row.aliases_before[CHAMPION], "champion or its tags moved"


def test_auto_review_records_what_was_trained_on(matrix: dict[str, Any]) -> None:
    workspace = Workspace.open(matrix["world"].ws)
    decisions = review.read_decisions(workspace)
    status = workspace_status(workspace)
    assert status["undecided"] == 0 and status["decisions"] == len(decisions), status
    catalog = _split_catalog(matrix, _row(matrix, "--refresh-cache"))
    trained = set(catalog[catalog["status"] == "ok"]["sha256"])
    assert {sha for sha, d in decisions.items() if d.decision == "approve"} >= trained
    assert {d.reviewer for d in decisions.values()} == {review.AUTO_REVIEWER, "tester"}


def test_a_one_label_workspace_exits_2_naming_the_label_and_registers_nothing(harness, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    for group in range(4):
        for index in range(2):
            make_image(tmp_path / "real" / f"p{group}" / f"{index}.jpg", seed=10 * group + index, size=(64, 64))
    empty = tmp_path / "ai_images"
    empty.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sources:\n  folders:\n    - {{path: {tmp_path / 'real'}, label: real}}\n    - {{path: {empty}, label: ai}}\n"
        "review: {mode: auto}\nsplit: {min_groups_per_label: 1}\naudit: {enabled: false}\n"
        "tracking: {system_metrics_interval_s: 0}\n"
        "train: {model: resnet18, weights: none, image_size: 16, epochs: 1, num_workers: 0}\n",
        encoding="utf-8",
    )
    ws = tmp_path / "ws"
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--workspace", str(ws)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "label 'ai' has too few groups (0 in train, 0 in val, 0 in test" in message, message
    assert f"put ai images into {empty}" in message and "aidetect import FOLDER --label ai" in message, message
    assert "Nothing was trained or registered" in message
    assert not list((ws / "models").iterdir()), "a model was trained"
    uri = tracking_uri(None, Workspace.open(ws))
    assert MlflowClient(tracking_uri=uri).search_registered_models() == [], "a one-label model was registered"
    run = recent_runs(uri, "aidetect")[0]
    notes = MlflowClient(tracking_uri=uri).download_artifacts(run["run_id"], "notes/split.txt", str(tmp_path))
    assert "label ai has no usable image" in Path(notes).read_text(encoding="utf-8")
    assert run["status"] == "FAILED"
