"""The `aidetect` command: parses options, checks the input, builds the config, calls flows. No logic of its own.

torch, Prefect, MLflow and pandas are imported inside the commands that need them, after the input is checked:
--help, input errors, a missing workspace and `status` answer at once, and bad input never starts Prefect.
Exit codes: 0 ok, 1 some files unreadable (predict), 2 bad input, 3 review pending, 4 no Prefect server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import click
import typer
from typer.core import TyperGroup

from pipeline_lib.core import privacy

if TYPE_CHECKING:
    from pipeline_lib.core.config import FolderSource, PipelineConfig
    from pipeline_lib.core.workspace import Workspace

EXIT_INPUT, EXIT_REVIEW, EXIT_NO_SERVER = 2, 3, 4  # 2: bad input or a damaged workspace
DEBUG_ENV = "AIDETECT_DEBUG"  # set by --debug (or by the user): errors show their traceback
DOCTOR_HINT = " (`aidetect doctor` checks the workspace; `--repair` sets damaged files aside)"
MLFLOW_HINT = (
    " (the MLflow store: mlflow.db in the workspace, or tracking.uri; `aidetect doctor` checks mlflow.db)"
)
PARQUET_HINT = " (a Parquet file of the workspace is damaged; `aidetect doctor` names it)"


def _known_failures() -> list[tuple[tuple[type[BaseException], ...], str]]:
    """(exception types, hint) of every failure aidetect explains in one line; imported only when one happened."""
    import sqlite3

    from pyarrow import ArrowException

    from pipeline_lib.acquire.crawl import SourceError
    from pipeline_lib.acquire.crawl_log import CrawlLogError
    from pipeline_lib.core.catalog import CatalogError
    from pipeline_lib.core.cluster import ClusterError
    from pipeline_lib.core.config import ConfigError
    from pipeline_lib.core.layout import UnusableWorkspaceError
    from pipeline_lib.core.tracking.logged_models import ModelNotFoundError
    from pipeline_lib.core.tracking.workspace_store import TrackingStoreError
    from pipeline_lib.core.workspace import WorkspaceBusyError, WorkspaceError
    from pipeline_lib.curate.audit import AuditError
    from pipeline_lib.curate.review import ReviewError
    from pipeline_lib.curate.split import SplitError
    from pipeline_lib.learn.models import CheckpointError, WeightsError, WeightsNotFoundError
    from pipeline_lib.learn.preprocess import PreprocessError

    return [
        ((ConfigError, SourceError, SplitError, AuditError, WorkspaceError, WorkspaceBusyError, ClusterError), ""),
        ((UnusableWorkspaceError, TrackingStoreError), ""),
        ((WeightsNotFoundError, WeightsError, ModelNotFoundError), ""),
        ((CatalogError, CrawlLogError, ReviewError, CheckpointError, PreprocessError), DOCTOR_HINT),
        ((sqlite3.DatabaseError,), MLFLOW_HINT),
        ((ArrowException,), PARQUET_HINT),
        ((FileNotFoundError, UnicodeDecodeError), ""),
    ]


def _causes(error: BaseException) -> list[BaseException]:
    """error and what caused it (MLflow and SQLAlchemy wrap the database's own error), outermost first."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def explain_failure(error: BaseException) -> str | None:
    """The one line a known failure (bad input, a damaged workspace) is shown as, naming the file to look at;
    None for anything else (a bug: its traceback is shown)."""
    known = _known_failures()
    for cause in _causes(error):
        for kinds, hint in known:
            if isinstance(cause, kinds):
                keys_per_line = type(cause).__name__ == "ConfigError"  # one line per wrong key
                text = str(cause) if keys_per_line else " ".join(str(cause).split())
                return f"{type(cause).__name__}: {text}{hint}"
    return None


class _KnownFailureTraceback(logging.Filter):
    """Keeps off the console the records Prefect logs with the traceback of a failed task or flow when the failure
    is a known one: the command prints its one line instead. Prefect's run logs (its API handler) keep them."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or explain_failure(error) is None


@contextlib.contextmanager
def _console_without_known_tracebacks() -> Iterator[None]:
    """_KnownFailureTraceback on Prefect's console handlers for the block (not with --debug)."""
    import prefect.main  # noqa: F401 - sets up Prefect's logging (its console handler) as a flow's import would
    from prefect.logging.handlers import PrefectConsoleHandler

    consoles = [] if _debug() else [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = _KnownFailureTraceback()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


class _Commands(TyperGroup):
    """The aidetect command group: every known failure of any command ends as one line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # a command's own exit (typer.Exit is not click's in this typer)
        except Exception as error:
            message = explain_failure(error)
            if message is None or _debug():
                raise
            typer.secho(message, fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_INPUT) from None


app = typer.Typer(
    cls=_Commands, help="aidetect: build and maintain a detector of AI-generated images.", no_args_is_help=True
)
review_app = typer.Typer(
    help="Manual review: counts, bulk decisions from CSV, the review page, resuming a waiting run.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")
weights_app = typer.Typer(help="Pretrained weights in TORCH_HOME's cache.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
server_app = typer.Typer(
    help="A Prefect server kept up between commands (saves each command the temporary server's start-up).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults).")]
WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. --set train.epochs=3")]
RefreshOpt = Annotated[bool, typer.Option("--refresh-cache", help="Recompute every stage.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_PORT = 47811  # loopback port of the demo's search site; stable so that a second demo run fetches nothing
PROGRESS_ENV, PROGRESS_LOGGER = "PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_lib.core.progress"


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (or AIDETECT_DEBUG=1).")] = False,
) -> None:
    """aidetect: build and maintain a detector of AI-generated images."""
    privacy.quiet_mlflow()  # before anything imports mlflow (it starts its telemetry client at import)
    os.environ.setdefault(PROGRESS_ENV, PROGRESS_LOGGER)  # before Prefect sets up logging: progress lines show
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _refuse(error: Exception) -> NoReturn:
    """Exit 2 with the one line of a known failure met before any stage runs (its traceback with --debug)."""
    if _debug():
        raise error
    _fail(f"{type(error).__name__}: {' '.join(str(error).split())}")


def _echo(lines: list[str]) -> None:
    typer.echo("\n".join(lines))


def _config(config: Path | None, workspace: Path | None, overrides: list[str] | None, refresh: bool) -> PipelineConfig:
    from pipeline_lib.core.config import ConfigError
    from pipeline_lib.core.config_loader import load_config

    extra = list(overrides or [])
    if workspace is not None:
        extra.append(f"execution.workspace={workspace}")
    if refresh:
        extra.append("execution.refresh_cache=true")
    try:
        return load_config(config, extra)
    except ConfigError as error:
        _fail(str(error))


def _workspace(workspace: Path | None) -> Workspace:
    from pipeline_lib.core.layout import UnusableWorkspaceError
    from pipeline_lib.core.workspace import Workspace, WorkspaceError

    try:
        return Workspace.open(workspace or Path("workspace"))
    except WorkspaceError as error:
        _fail(str(error))
    except UnusableWorkspaceError as error:
        _refuse(error)


def _check_sources(cfg: PipelineConfig) -> None:
    """Every source of the config (and the workspace's imports) as a crawl would check it, before Prefect starts."""
    if not cfg.execution.crawl:
        return
    from pipeline_lib.acquire.crawl import check_sources
    from pipeline_lib.acquire.imports import with_imports
    from pipeline_lib.core.config import ConfigError
    from pipeline_lib.core.layout import UnusableWorkspaceError
    from pipeline_lib.core.workspace import Workspace, WorkspaceError

    try:
        workspace = Workspace.open(cfg.execution.workspace)
    except WorkspaceError:
        workspace = None  # a new workspace has no imports yet
    except UnusableWorkspaceError as error:
        _refuse(error)
    try:
        check_sources(with_imports(cfg.sources, workspace) if workspace else cfg.sources)
    except (ConfigError, ValueError, OSError) as error:
        _fail(f"invalid source: {error}")


def _import_flows() -> None:
    """Import the flows (Prefect, pandas, MLflow: seconds), e.g. while a temporary server starts."""
    import flows.pipeline  # noqa: F401 - imported for its time, used by the caller


@contextlib.contextmanager
def _prefect() -> Iterator[str]:
    """The Prefect API of this command's flows (flows.runtime.prefect_session): PREFECT_API_URL, the server of
    `aidetect server start`, or a temporary server started now (while the flows are imported); exit 4 with one
    line when that does not start."""
    from flows.runtime import PrefectStartError, prefect_session

    with contextlib.ExitStack() as stack:
        try:
            api = stack.enter_context(prefect_session(prepare=_import_flows))
        except PrefectStartError as error:
            if _debug():
                raise
            _fail(str(error), code=EXIT_NO_SERVER)
        stack.enter_context(_console_without_known_tracebacks())
        yield api


@contextlib.contextmanager
def _writer(cfg: PipelineConfig, command: str, create: bool = False) -> Iterator[None]:
    """The command's hold on its workspace, taken before anything is written and before Prefect starts: the
    workspace checked (a folder, a layout it knows, a sound tracking store) and its writer lock held until the
    command ends, so that a command that loses the lock exits 2 in one line having changed nothing.

    A workspace that does not exist yet is made here only when create; otherwise the flow makes it, then locks it.
    """
    from pipeline_lib.core.layout import UnusableWorkspaceError
    from pipeline_lib.core.workspace import WorkspaceBusyError

    with contextlib.ExitStack() as stack:
        try:
            _hold_workspace(stack, cfg, command, create)
        except (UnusableWorkspaceError, WorkspaceBusyError) as error:
            _refuse(error)
        yield


def _hold_workspace(stack: contextlib.ExitStack, cfg: PipelineConfig, command: str, create: bool) -> None:
    """_writer's checks, with the lock entered on stack. A folder that is not a workspace yet is locked before
    anything is made in it; a path that does not exist yet is left to the flow unless create."""
    from pipeline_lib.core.layout import check_creatable
    from pipeline_lib.core.workspace import Workspace, WorkspaceError, workspace_lock

    root = Path(cfg.execution.workspace).expanduser().resolve()
    try:
        workspace = Workspace.open(root)
    except WorkspaceError:  # not a workspace yet (a path that cannot hold one raised UnusableWorkspaceError)
        if not root.exists():
            check_creatable(root)
            if not create:
                return
            root.mkdir(parents=True, exist_ok=True)  # the lock file's folder; the workspace is made under the lock
        workspace = Workspace(root)
    stack.enter_context(workspace_lock(workspace, command))
    if create:
        Workspace.create(root)
    from pipeline_lib.core.tracking.store import tracking_uri
    from pipeline_lib.core.tracking.workspace_store import TrackingStoreError, check_store

    try:
        check_store(tracking_uri(cfg.tracking.uri, workspace))
    except TrackingStoreError as error:
        _refuse(error)


def _run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    from pipeline_lib.core.cluster import ClusterError
    from pipeline_lib.core.config import ConfigError
    from pipeline_lib.core.workspace import WorkspaceError
    from pipeline_lib.curate.review import ReviewPending

    with _prefect():
        from flows.pipeline import run_pipeline
        from pipeline_lib.curate.split import SplitError

        try:
            return run_pipeline(cfg)
        except ReviewPending as error:
            _fail(str(error), code=EXIT_REVIEW)
        except (ClusterError, ConfigError, SplitError, WorkspaceError, *_weights_errors()) as error:
            if _debug():
                raise
            _fail(f"{type(error).__name__}: {error}")
        except Exception as error:
            if _review_timed_out(error):  # Prefect fails a run whose pause expired before the gate can say more
                _fail(
                    "the review gate timed out with images still pending: decide them with "
                    f"`aidetect review serve --workspace {cfg.execution.workspace}`, then run `aidetect run` again",
                    code=EXIT_REVIEW,
                )
            raise


def _weights_errors() -> tuple[type[Exception], ...]:
    """The initial weights' errors: imported only when a run failed (an except clause is evaluated then), as the
    models module imports torch, which a run whose model stages are cached never needs."""
    from pipeline_lib.learn.models import WeightsError, WeightsNotFoundError

    return WeightsNotFoundError, WeightsError


def _review_timed_out(error: BaseException) -> bool:
    """True if error (or its cause) is a pause that expired: a FlowPauseTimeout or a run 'never resumed'."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "FlowPauseTimeout" or "never resumed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _print_summary(summary: dict[str, Any]) -> None:
    from pipeline_lib.ops.summary import run_lines

    _echo(run_lines(summary))


@app.command()
def run(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    refresh_cache: RefreshOpt = False,
    reshuffle: Annotated[
        bool, typer.Option("--reshuffle", help="Start a new split registry version (after changing split ratios/seed).")
    ] = False,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote",
            help="Make this run's model the champion even when no fair comparison is possible (the champion "
            "trained on some of the test images, e.g. after --reshuffle).",
        ),
    ] = False,
):
    """Run the whole pipeline (cached stages are skipped)."""
    extra = list(set_ or []) + (["execution.reshuffle_splits=true"] if reshuffle else [])
    extra += ["execution.promote=true"] if promote else []
    cfg = _config(config, workspace, extra, refresh_cache)
    _check_sources(cfg)
    with _writer(cfg, "aidetect run"):
        summary = _run_pipeline(cfg)
    _print_summary(summary)


def _crawl(cfg: PipelineConfig, as_json: bool, folders: list[FolderSource] | None = None) -> None:
    """Run the crawl flow (inside _prefect()) and print what it did (and, for folders, what became of every file)."""
    from flows.pipeline import crawl_flow

    result = crawl_flow(cfg)
    accounts = _accounts(cfg, folders)
    if as_json:
        result["folders"] = [
            {"folder": str(a.folder), "files": [vars(item) for item in a.files]} for a in accounts
        ]
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    from pipeline_lib.ops.summary import crawl_lines

    _echo(crawl_lines(result, accounts))
    typer.echo(f"\ncatalog: {result['catalog']}  (MLflow run {result['mlflow_run_id']})")


def _accounts(cfg: PipelineConfig, folders: list[FolderSource] | None) -> list[Any]:
    """The file accounting of the given folder sources (default: every folder the crawl read, imports included)."""
    from pipeline_lib.acquire.imports import with_imports
    from pipeline_lib.core.workspace import Workspace
    from pipeline_lib.ops.status import folder_accounts

    workspace = Workspace.open(cfg.execution.workspace)
    return folder_accounts(workspace, folders if folders is not None else with_imports(cfg.sources, workspace).folders)


@app.command()
def crawl(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    refresh_cache: RefreshOpt = False,
    as_json: JsonOpt = False,
):
    """Crawl and ingest only: grow the catalog."""
    cfg = _config(config, workspace, set_, refresh_cache)
    _check_sources(cfg)
    with _writer(cfg, "aidetect crawl"), _prefect():
        _crawl(cfg, as_json)


def _folder_source(folder: Path, label: str, group_by: str, generator: str, follow: bool) -> FolderSource:
    """The import as a folder source; exit 2 naming the option that is wrong."""
    from pydantic import ValidationError

    from pipeline_lib.core.config import FolderSource

    try:
        return FolderSource(
            path=folder.resolve(), label=label, group_by=group_by, generator=generator, follow_symlinks=follow
        )
    except ValidationError as error:
        fields = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        _fail(f"invalid import: {fields}")


def _check_folder(source: FolderSource) -> None:
    """The folder exists and holds at least one image; its grouping works (CSV readable); else exit 2."""
    from pipeline_lib.acquire.local_files import folder_entries

    folder = source.path
    if not folder.is_dir():
        _fail(f"import folder {folder} does not exist or is not a directory")
    entries = list(folder_entries(folder, source.follow_symlinks))
    if not entries:
        _fail(f"import folder {folder} is empty (hidden files are not imported)")
    from pipeline_lib.acquire.folders import left_out_reason

    if all(left_out_reason(folder, entry) for entry in entries):  # stops at the first image
        listed = ", ".join(f"{e.path.relative_to(folder)} ({left_out_reason(folder, e)})" for e in entries[:3])
        _fail(f"no images among the {len(entries)} file(s) in {folder}: {listed}")
    if not source.group_by.startswith("csv:"):
        return  # folder and pattern grouping were checked with the options
    from pipeline_lib.acquire.crawl import check_sources
    from pipeline_lib.core.config import SourcesConfig

    try:
        check_sources(SourcesConfig(folders=[source]))
    except (ValueError, OSError) as error:
        _fail(f"invalid import: {str(error).replace('sources.folders[0].group_by', '--group-by')}")


@app.command("import")
def import_folder(
    folder: Annotated[Path, typer.Argument(help="Folder of images, e.g. Midjourney or Stable Diffusion output.")],
    label: Annotated[str, typer.Option("--label", help="real or ai")],
    group_by: Annotated[
        str, typer.Option("--group-by", help="folder | pattern:REGEX | csv:FILE (columns file,group[,generator])")
    ] = "folder",
    generator: Annotated[
        str, typer.Option(help="e.g. midjourney, stable-diffusion (a csv:FILE generator column overrides it per file)")
    ] = "unknown",
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Follow symlinks that point inside the folder (without it every symlink is left out; one pointing "
            "outside the folder always is).",
        ),
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
):
    """Add a folder of local images to the workspace (kept as a source of every later run) and ingest it now.

    Every file that is not hidden is looked at: images are imported whatever their extension, every other file
    (symlinks included) is listed with the reason it was left out. Nothing outside the folder is read.
    """
    source = _folder_source(folder, label, group_by, generator, follow_symlinks)
    _check_folder(source)
    no_sources = ["sources.search=[]", "sources.urls=[]", "sources.folders=[]"]
    cfg = _config(config, workspace, list(set_ or []) + no_sources, False)
    # The lock first, then a Prefect API: the folder is recorded only by the command that holds the workspace, and
    # only when flows can run.
    with _writer(cfg, f"aidetect import {source.path}", create=True), _prefect():
        from pipeline_lib.acquire.imports import add_import
        from pipeline_lib.core.config import ConfigError
        from pipeline_lib.core.workspace import Workspace

        try:
            add_import(Workspace.open(cfg.execution.workspace), source)
        except ConfigError as error:
            _fail(str(error))
        _crawl(cfg, as_json, [source])


@app.command()
def demo(
    workspace: Annotated[Path, typer.Option("--workspace", "-w")] = Path("demo-workspace"),
    config: ConfigOpt = None,
    persons: Annotated[int, typer.Option(help="Synthetic persons per class.", min=3)] = 30,
    set_: SetOpt = None,
    refresh_cache: RefreshOpt = False,
):
    """Offline demo on synthetic data: loopback crawl with icrawler, folder import, train, report."""
    from pipeline_lib.core.config import ConfigError
    from pipeline_lib.core.config_loader import build_config, merge_mappings, read_yaml_mapping

    workspace = workspace.resolve()
    extra = list(set_ or []) + (["execution.refresh_cache=true"] if refresh_cache else [])
    try:
        base = read_yaml_mapping(DEMO_CONFIG)
        overlay = {k: v for k, v in (read_yaml_mapping(config) if config else {}).items() if k != "sources"}
        data = merge_mappings(merge_mappings(base, overlay), {"execution": {"workspace": str(workspace)}})
        checked = build_config(data, extra, origin="demo config")  # before any data is drawn or Prefect starts
    except ConfigError as error:
        _fail(str(error))
    from pipeline_lib.ops import demo_data

    data_root = workspace / "demo-data"
    with _writer(checked, "aidetect demo", create=True):
        typer.echo(f"generating synthetic demo data in {data_root} (not real people: drawn faces)")
        dataset = demo_data.generate_demo_dataset(data_root, n_persons_per_class=persons)
        with demo_data.search_site(dataset, port=DEMO_PORT) as endpoint:
            typer.echo(f"serving the 'real' class on a loopback search page: {endpoint}")
            cfg = build_config(
                merge_mappings(merge_mappings(base, demo_data.demo_config_dict(dataset, endpoint, workspace)), overlay),
                extra,
                origin="demo config",
            )
            summary = _run_pipeline(cfg)
    _print_summary(summary)


@app.command()
def status(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
):
    """Catalog counts by status, label and split; pending reviews; imported folders, file by file; last runs (and
    the tracking URI of the config they are recorded in)."""
    cfg = _config(config, workspace, set_, False)
    ws = _workspace(cfg.execution.workspace)
    from pipeline_lib.core.tracking.workspace_store import TrackingStoreError, check_store
    from pipeline_lib.ops.status import folder_accounts, recent_runs, workspace_status

    info = workspace_status(ws)
    info["tracking_uri"] = cfg.tracking.uri or f"sqlite:///{ws.root / 'mlflow.db'}"
    info["runs"] = recent_runs(ws)
    server = cfg.tracking.uri if (cfg.tracking.uri or "").startswith(("http://", "https://")) else None
    if server and not _server_is_up(server):
        info["runs"], info["runs_error"] = [], f"no MLflow tracking server answers at {server} (tracking.uri)"
    try:
        check_store(info["tracking_uri"], deep=False)  # SQLite's own check only: status answers at once
    except TrackingStoreError as error:
        info["tracking_error"] = str(error)
    accounts = folder_accounts(ws)
    if as_json:
        info["imports"] = [{"folder": str(a.folder), "files": [vars(item) for item in a.files]} for a in accounts]
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        from pipeline_lib.ops.summary import status_lines

        _echo(status_lines(info, accounts))
    if "tracking_error" in info:
        _fail(f"TrackingStoreError: {info['tracking_error']}")


@review_app.command("status")
def review_status(workspace: WorkspaceOpt = None):
    """How many images are decided, approved, rejected and still undecided."""
    ws = _workspace(workspace)
    from pipeline_lib.curate.review import read_decisions
    from pipeline_lib.ops.status import workspace_status

    decisions = read_decisions(ws).values()
    approved = sum(d.decision == "approve" for d in decisions)
    typer.echo(
        f"approved: {approved}, rejected: {len(decisions) - approved}, "
        f"undecided: {workspace_status(ws).get('undecided', 0)}"
    )


@review_app.command("queue")
def review_queue(workspace: WorkspaceOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False):
    """The undecided images in review-queue order: suspicion (0..1), reasons, suggested decision and why.

    Scored by the champion (tracking.registered_model in tracking.uri), else by the newest model trained in the
    workspace, else by near-duplicate, face and tiny hints alone; features are cached per image and model.
    """
    cfg = _config(config, workspace, None, False)
    ws = _workspace(cfg.execution.workspace)
    from pipeline_lib.core.catalog import read_parquet_file
    from pipeline_lib.ops.status import latest_snapshot

    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")
    queue = _score_queue(cfg, ws, read_parquet_file(snapshot))
    from pipeline_lib.assess.review_queue import queue_lines

    if as_json:
        rows = queue.rows.assign(reasons=queue.rows["reasons"].map(list)).to_dict("records")
        typer.echo(json.dumps({"scorer": queue.scorer, "note": queue.note, "images": rows}, indent=2))
        return
    _echo(queue_lines(queue, cfg.review.suspicion_threshold))


def _score_queue(cfg: PipelineConfig, ws: Workspace, catalog: Any) -> Any:
    """The review queue of catalog's undecided images, scored as the flow's review-queue stage scores it."""
    from pipeline_lib.assess.review_queue import QueueSettings, score_queue
    from pipeline_lib.core.tracking.store import tracking_uri

    settings = QueueSettings(tiny_side=cfg.review.tiny_side, device=cfg.train.device)
    uri = tracking_uri(cfg.tracking.uri, ws)
    return score_queue(ws, catalog, uri, cfg.tracking.registered_model, settings, cfg.tracking.trust_pickle)


@review_app.command("export")
def review_export(target: Path, workspace: WorkspaceOpt = None):
    """Write undecided images to a CSV (sha256,label,group,url,decision,reason) to fill in."""
    ws = _workspace(workspace)
    from pipeline_lib.core.catalog import STATUS_OK, read_parquet_file
    from pipeline_lib.curate.review import read_decisions
    from pipeline_lib.ops.status import latest_snapshot

    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")
    table = read_parquet_file(snapshot)
    decided = read_decisions(ws)
    todo = table[(table["status"] == STATUS_OK) & ~table["sha256"].isin(decided)].drop_duplicates("sha256")
    todo[["sha256", "label", "group", "url"]].assign(decision="", reason="").to_csv(target, index=False)
    typer.echo(f"{len(todo)} undecided image(s) written to {target}; fill decision with approve/reject")


@review_app.command("pack")
def review_pack(
    workspace: WorkspaceOpt = None,
    thumbnail_size: Annotated[int, typer.Option(help="Longest side of the thumbnails, pixels.", min=32)] = 160,
):
    """Build the review pack now (review/pack/index.html: thumbnails, near-duplicate clusters, hints).

    A run builds it by itself only in review.mode=require; thumbnails already made are reused.
    """
    ws = _workspace(workspace)
    from pipeline_lib.core.catalog import read_parquet_file
    from pipeline_lib.curate.review import ReviewError, apply_decisions, read_decisions
    from pipeline_lib.curate.review_pack import write_review_pack
    from pipeline_lib.ops.status import latest_snapshot

    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")
    try:
        outcome = apply_decisions(read_parquet_file(snapshot), read_decisions(ws), "require")
    except ReviewError as error:
        _fail(str(error))
    index = write_review_pack(ws, outcome.catalog, thumbnail_size)
    typer.echo(f"review pack: {index} ({outcome.pending} image(s) undecided)")


@review_app.command("apply")
def review_apply(csv_file: Path, workspace: WorkspaceOpt = None, reviewer: str = "csv"):
    """Append the decisions of a CSV (sha256,decision[,reason]) to review/decisions.jsonl."""
    ws = _workspace(workspace)
    from pipeline_lib.core.catalog import read_parquet_file
    from pipeline_lib.curate.review import ReviewError, append_decisions, read_decisions_csv, set_aside_cut_off_line
    from pipeline_lib.ops.status import latest_snapshot

    snapshot = latest_snapshot(ws, "dedup")
    known = set(read_parquet_file(snapshot)["sha256"]) if snapshot is not None else set()
    try:
        decisions = read_decisions_csv(csv_file, reviewer)
    except ReviewError as error:
        _fail(f"nothing applied: {error}")
        raise
    repaired = set_aside_cut_off_line(ws)
    if repaired:
        typer.secho(f"warning: {repaired}", fg=typer.colors.YELLOW, err=True)
    try:
        count = append_decisions(ws, decisions, known)
    except ReviewError as error:
        _fail(f"nothing applied: {error}")
    typer.echo(f"{count} decision(s) recorded; run the pipeline again to continue")


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config every deployment runs with (default: prefect.yaml's).")
    ] = None,
):
    """Run prefect.yaml's schedules in this process (Prefect's serve), against a running Prefect server."""
    if config is not None and not config.is_file():
        _fail(f"config file not found: {config}")
    from flows.server import prefect_api

    with prefect_api() as api:  # PREFECT_API_URL, else the server of `aidetect server start`
        if not api:
            _fail(
                "schedules need a Prefect server, and PREFECT_API_URL is not set. Start one with "
                "`aidetect server start` (or `prefect server start`, then "
                "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`) and run `aidetect serve` again."
            )
        if not _server_is_up(api):
            _fail(f"no Prefect server answers at {api}: start it with `prefect server start` (or fix PREFECT_API_URL)")
        from prefect import serve as prefect_serve

        from flows.deployments import runner_deployments

        deployments = runner_deployments(str(config.resolve()) if config else None)
        typer.echo(f"serving {len(deployments)} deployment(s) against {api}; Ctrl-C stops")
        prefect_serve(*deployments)


def _server_is_up(api: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@review_app.command("serve")
def review_serve(
    workspace: WorkspaceOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the review page.")] = 8765,
    config: ConfigOpt = None,
    queue: Annotated[bool, typer.Option(help="Show the review queue's order, reasons and suggestions.")] = True,
):
    """Serve the review page for the undecided images; 'finish review' resumes a waiting run if there is one.

    With --queue (the default) the page shows the review queue (`aidetect review queue`): suspects first.
    """
    cfg = _config(config, workspace, None, False)
    ws = _workspace(cfg.execution.workspace)
    from pipeline_lib.core.catalog import read_parquet_file
    from pipeline_lib.curate import review_access, review_server
    from pipeline_lib.curate.review import read_waiting
    from pipeline_lib.ops.status import latest_snapshot

    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")

    def on_finish(item: review_server.FinishIn) -> review_server.FinishResult:
        waiting = read_waiting(ws)
        if waiting is None:
            return review_server.FinishResult(f"decisions saved; run `aidetect run --workspace {ws.root}` again")
        from flows.review_gate import resume_run
        from flows.server import prefect_api

        try:
            with prefect_api():
                accepted, message = resume_run(str(waiting["flow_run_id"]), item.approve_remaining, item.note)
        except Exception as error:  # noqa: BLE001 - shown on the page
            return review_server.FinishResult(f"decisions saved; could not resume the waiting run: {error}")
        return review_server.FinishResult(message, accepted)

    token = review_access.access_token(host)
    catalog = read_parquet_file(snapshot)
    rows = _score_queue(cfg, ws, catalog).rows if queue else None
    threshold = cfg.review.suspicion_threshold
    app_ = review_server.create_app(
        ws, catalog, on_finish, reviewer="web", token=token, queue=rows, threshold=threshold
    )
    if token:
        typer.secho(f"warning: {review_access.exposure_warning(host)}", fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"review page: {review_access.page_url(f'http://{shown}:{port}/', token)}  (Ctrl-C to stop)")
    review_server.serve_forever(app_, host, port)


@review_app.command("done")
def review_done(
    workspace: WorkspaceOpt = None,
    approve_remaining: Annotated[bool, typer.Option(help="Approve every image still undecided.")] = False,
    note: str = "",
):
    """Resume the flow run that waits at the review gate (needs the Prefect server the run uses)."""
    ws = _workspace(workspace)
    from pipeline_lib.curate.review import ReviewError, read_waiting

    try:
        waiting = read_waiting(ws)
    except ReviewError as error:
        _fail(str(error))
    if waiting is None:
        _fail(f"no flow run waits at the review gate of {ws.root}; run `aidetect run --workspace {ws.root}`")
    from flows.review_gate import resume_run
    from flows.server import prefect_api

    try:
        with prefect_api():
            accepted, message = resume_run(str(waiting["flow_run_id"]), approve_remaining, note)
    except Exception as error:  # noqa: BLE001 - a clear message instead of a traceback
        _fail(f"could not resume flow run {waiting['flow_run_id']}: {error} (is PREFECT_API_URL the run's server?)")
    if not accepted:
        _fail(message)
    typer.echo(message)


@server_app.command("start")
def server_start(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the Prefect API and UI.", min=1, max=65535)] = 4200,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to answer.", min=1)] = 180.0,
):
    """Start a Prefect server in the background (analytics off) that later commands use instead of a temporary one.

    It keeps running until `aidetect server stop`; its UI shows every run, and `aidetect review done` and
    schedules work against it. PREFECT_API_URL, when set, is used instead.
    """
    from flows.server import ServerError, prefect_home, start_server

    home = prefect_home()
    try:
        record, started = start_server(home, host, port, timeout)
    except ServerError as error:
        _fail(str(error))
    verb = "started" if started else "already running"
    typer.echo(f"Prefect server {verb}: {record.api_url} (UI {record.api_url.removesuffix('/api')}, pid {record.pid})")
    typer.echo("`aidetect` commands without PREFECT_API_URL now use it; stop it with `aidetect server stop`")


@server_app.command("stop")
def server_stop():
    """Stop the Prefect server started by `aidetect server start`."""
    from flows.server import ServerError, prefect_home, stop_server

    try:
        record = stop_server(prefect_home())
    except ServerError as error:
        _fail(str(error))
    typer.echo("no server was started by `aidetect server start`" if record is None else f"stopped {record.api_url}")


@server_app.command("status")
def server_status():
    """Which Prefect API the next command uses: PREFECT_API_URL, the background server, or a temporary one."""
    from flows.server import prefect_api

    with prefect_api() as api:
        typer.echo(f"Prefect API: {api}" if api else "no server running: each command starts a temporary one")


@app.command()
def doctor(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Repair what is safe (set damaged files aside).")] = False,
    deep: Annotated[bool, typer.Option("--deep", help="Also hash every stored file against its name.")] = False,
    as_json: JsonOpt = False,
):
    """Check a workspace (snapshots, store against the crawl log, decisions, checkpoints, mlflow.db, leftovers of
    killed runs) and, with --repair, repair what is safe. Exit 0 when nothing is left to fix, 2 otherwise."""
    cfg = _config(config, workspace, None, False)
    ws = _workspace(cfg.execution.workspace)
    from dataclasses import asdict

    from pipeline_lib.core.workspace import workspace_lock
    from pipeline_lib.ops.doctor import Doctor, diagnose

    checkup = Doctor(ws, repair, deep, cfg.sources, cfg.tracking.uri, cfg.tracking.experiment)
    if repair:
        with workspace_lock(ws, "aidetect doctor --repair"):
            findings = diagnose(checkup)
    else:
        findings = diagnose(checkup)
    if as_json:
        typer.echo(json.dumps([asdict(f) | {"open": f.open} for f in findings], indent=2))
    else:
        for finding in findings:
            typer.secho(finding.line(), fg=typer.colors.RED if finding.open else None)
    remaining = [f for f in findings if f.open]
    if remaining:
        hint = "" if repair else "; `aidetect doctor --repair` repairs what is safe to repair"
        typer.secho(f"{len(remaining)} problem(s) left in {ws.root}{hint}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_INPUT)
    typer.echo(f"workspace {ws.root}: nothing left to repair")


def mlflow_ui_command(uri: str, artifact_root: str, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line on a database store (telemetry stays off: it inherits this environment)."""
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    return command + ["--default-artifact-root", artifact_root]


@app.command()
def ui(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    port: Annotated[int | None, typer.Option(help="Port of the UI (default 5000).")] = None,
    host: Annotated[str | None, typer.Option(help="Address of the UI (default 127.0.0.1).")] = None,
):
    """The MLflow UI of tracking.uri: a tracking server's own, or started here on a database store (default: the
    workspace's SQLite), at the experiment's runs table in the training view; and how to start Prefect's."""
    cfg = _config(config, workspace, set_, False)
    from pipeline_lib.core.tracking import store

    prefect_hint = "Prefect UI: run `prefect server start` in another shell, then http://127.0.0.1:4200"
    if cfg.tracking.uri and store.is_server(cfg.tracking.uri):
        server = store.ui_address(cfg.tracking.uri)
        found = store.find_experiment(server, cfg.tracking.experiment) if _server_is_up(server) else None
        page = store.experiment_page(server, found) if found else server
        typer.echo(f"MLflow UI: {page}  (the tracking server of tracking.uri)")
        typer.echo(prefect_hint)
        return
    ws = _workspace(cfg.execution.workspace)
    from pipeline_lib.core.tracking.workspace_store import open_store

    uri = open_store(cfg.tracking.uri, ws)
    host, port = host or store.LOCAL_UI_HOST, port or store.LOCAL_UI_PORT
    command = mlflow_ui_command(uri, store.artifact_root(ws), host, port)
    shown = f"[{host}]" if ":" in host else host
    page = store.experiment_page(f"http://{shown}:{port}", store.ensure_experiment(uri, cfg.tracking.experiment, ws))
    typer.echo(f"MLflow UI: {page}  (store {uri})")
    typer.echo(prefect_hint)
    sys.stdout.flush()
    os.execv(command[0], command) if os.name == "posix" else subprocess.run(command, check=False)


@weights_app.command("fetch")
def weights_fetch(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A train.model: resnet50, resnet18, efficientnet_b0, convnext_tiny, or a foundation backbone "
            "(clip_vit_b16, clip_vit_l14, clip_vit_b16_laion, clip_vit_l14_laion, dinov2_vits14, dinov2_vitb14, "
            "dinov2_vitl14; docs/backbones.md). Default: the config's model."
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Download from this URL (a mirror) instead of the publisher's; torchvision files: name-<sha256>.pth.",
        ),
    ] = None,
    config: ConfigOpt = None,
):
    """Download the published weights `train.weights: imagenet` / `pretrained` start from into TORCH_HOME's cache,
    hash-checked."""
    base = _config(config, None, None, False).train
    name = model or base.model
    source = url or (base.weights_url if name == base.model else None)
    overrides = [f"train.model={name}"] + ([f"train.weights_url={source}"] if source else [])
    train = _config(config, None, overrides, False).train
    from pipeline_lib.learn import models

    try:
        fetched = models.fetch_weights(train.model, train.weights_url)
    except (models.WeightsNotFoundError, models.WeightsError) as error:
        _fail(str(error))
    state = "downloaded to" if fetched.downloaded else "already in the cache:"
    typer.echo(f"{train.model}: {state} {fetched.path}")
    typer.echo(f"sha256 {fetched.sha256}")


def _predict_model(
    spec: str, config: Path | None, workspace: Path | None, trust_pickle: bool = False
) -> tuple[Any, dict[str, Any]]:
    """(model, meta with image_size and a description of the model) from a checkpoint, 'champion' or a run id.

    Registered models are rebuilt from their state_dict (weights only); unpickling only with trust_pickle.
    """
    path = Path(spec).expanduser()
    if path.suffix == ".pt" or path.is_file():
        from pipeline_lib.learn import models

        try:
            model, meta = models.load_model(path)
        except (FileNotFoundError, models.CheckpointError) as error:
            _fail(f"model not found: {error}")
        return model, meta | {"description": f"checkpoint {path}"}
    cfg = _config(config, workspace, None, False)
    ws = None if cfg.tracking.uri else _workspace(cfg.execution.workspace)
    from pipeline_lib.assess import registry
    from pipeline_lib.core.tracking import versions, workspace_store
    from pipeline_lib.core.tracking.logged_models import ModelNotFoundError

    uri = cfg.tracking.uri or workspace_store.open_store(None, ws)
    name = cfg.tracking.registered_model
    trust = trust_pickle or cfg.tracking.trust_pickle
    try:
        if spec == "champion":
            model, size = registry.load_champion(uri, name, trust_pickle=trust)
            calibration = versions.champion_calibration(uri, name)
            description = f"{name} version {versions.current_champion(uri, name).version} (alias champion)"
        else:
            model, size = registry.load_run_model(uri, spec, trust)
            calibration, description = versions.run_calibration(uri, spec), f"the model of MLflow run {spec}"
            if calibration is None:
                typer.secho(
                    f"note: run {spec} records no calibration: p_ai is the model's own softmax and the files are "
                    "decoded without normalisation",
                    fg=typer.colors.YELLOW,
                    err=True,
                )
    except ModelNotFoundError as error:
        _fail(f"model not found: {error}")
    return model, {"image_size": size, "model": spec, "calibration": calibration, "description": description}


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked recursively).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="champion, an MLflow run id, or a checkpoint file (.pt).")
    ] = "champion",
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    cam: Annotated[Path | None, typer.Option("--cam", help="Write CAM overlay PNGs into this folder.")] = None,
    cam_method: Annotated[str, typer.Option("--cam-method", help="gradcam, gradcam++, eigencam, scorecam")] = "gradcam",
    cam_target: Annotated[
        str | None,
        typer.Option("--cam-target", help="predicted, ai or real: what CAMs explain (default: report.cam_target)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0)] = 0.5,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    ] = "auto",
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow unpickling a registered model that carries no state_dict (runs code from the tracking store).",
        ),
    ] = False,
):
    """A verdict per image: ai, real or uncertain (band from config calibration), with p_ai.

    The temperature and normalisation of training are applied: from a checkpoint's <model>.calibration.json, or from
    the champion's or the run's calibration tag (--model champion / RUN_ID). The model scores (and explains) the
    images in batches on --device. The first line says which model scored the files. Files ingest would refuse by
    their header (config ingest: max_pixels, min_side, animated) are not decoded and get an error row.
    Exit 1 if some file could not be read or was refused, 2 if the model or images are missing or the device is not
    available.
    """
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        _fail("not found: " + ", ".join(missing))
    checkpoint = Path(model).expanduser()
    settings = _config(config, workspace, None, False)
    band_config = settings.calibration
    if not (checkpoint.suffix == ".pt" or checkpoint.is_file()):
        _workspace_or_uri(config, workspace)
    from pipeline_lib.assess.predict import collect_paths, parse_calibration, predict_files, read_calibration
    from pipeline_lib.core.devices import resolve_device

    if not collect_paths(paths):
        _fail("no image files found in: " + ", ".join(map(str, paths)))
    try:
        where = resolve_device(device)
    except (ValueError, RuntimeError) as error:
        _fail(f"--device: {error}")
    loaded, meta = _predict_model(model, config, workspace, trust_pickle)
    try:
        if checkpoint.is_file():
            calibration = read_calibration(checkpoint)
        elif meta.get("calibration"):
            calibration = parse_calibration(meta["calibration"], f"calibration tag of model {model!r}")
        else:
            calibration = None
        band = (band_config.uncertain_low, band_config.uncertain_high)
        rows = predict_files(
            loaded,
            meta,
            paths,
            batch_size,
            cam_dir=cam,
            cam_method=cam_method,
            threshold=threshold,
            calibration=calibration,
            band=band,
            cam_target=cam_target or settings.report.cam_target,
            device=where,
            ingest=settings.ingest,
        )
    except ValueError as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        from pipeline_lib.ops.summary import prediction_lines

        _echo(prediction_lines(rows, meta["description"]))
    if any(row.error for row in rows):
        raise typer.Exit(1)


def _workspace_or_uri(config: Path | None, workspace: Path | None) -> None:
    """Exit 2 at once when the model must come from a workspace that does not exist (before torch is imported)."""
    cfg = _config(config, workspace, None, False)
    if not cfg.tracking.uri:
        _workspace(cfg.execution.workspace)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
