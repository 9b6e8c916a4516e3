"""The `aidetect` command: parses options, builds the config, calls flows. No logic of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from pipeline_lib.config import (
    ConfigError,
    PipelineConfig,
    build_config,
    load_config,
    merge_mappings,
    read_yaml_mapping,
)
from pipeline_lib.review import ReviewError, ReviewPending
from pipeline_lib.workspace import Workspace, WorkspaceError

EXIT_INPUT = 2  # bad input or a damaged workspace
DEBUG_ENV = "AIDETECT_DEBUG"  # set to 1 to see the traceback of a known failure too
DOCTOR_HINT = " (`aidetect doctor` checks the workspace; `--repair` sets damaged files aside)"
MLFLOW_HINT = (
    " (the MLflow store: mlflow.db in the workspace, or tracking.uri; `aidetect doctor` checks mlflow.db)"
)
PARQUET_HINT = " (a Parquet file of the workspace is damaged; `aidetect doctor` names it)"


def _known_failures() -> list[tuple[tuple[type[BaseException], ...], str]]:
    """(exception types, hint) of every failure aidetect explains in one line; imported only when one happened."""
    import sqlite3

    from pyarrow import ArrowException

    from pipeline_lib.audit import AuditError
    from pipeline_lib.catalog import CatalogError
    from pipeline_lib.crawl import CrawlLogError, SourceError
    from pipeline_lib.models import CheckpointError, WeightsError, WeightsNotFoundError
    from pipeline_lib.preprocess import PreprocessError
    from pipeline_lib.split import SplitError
    from pipeline_lib.tracking import ModelNotFoundError
    from pipeline_lib.workspace import WorkspaceBusyError

    return [
        ((ConfigError, SourceError, SplitError, AuditError, WorkspaceError, WorkspaceBusyError), ""),
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
                text = str(cause) if isinstance(cause, ConfigError) else " ".join(str(cause).split())  # keys per line
                return f"{type(cause).__name__}: {text}{hint}"
    return None


class _Commands(TyperGroup):
    """The aidetect command group: every known failure of any command ends as one line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:
            message = explain_failure(error)
            if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
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

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults).")]
WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. --set train.epochs=3")]
RefreshOpt = Annotated[bool, typer.Option("--refresh-cache", help="Recompute every stage.")]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_PORT = 47811  # loopback port of the demo's search site; stable so that a second demo run is fully cached
TEMPORARY_SERVER_START_S = 120  # a busy 2-core machine needs more than Prefect's 20 s to start its server


def _fail(message: str, code: int = 2) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config(config: Path | None, workspace: Path | None, overrides: list[str] | None, refresh: bool) -> PipelineConfig:
    extra = list(overrides or [])
    if workspace is not None:
        extra.append(f"execution.workspace={workspace}")
    if refresh:
        extra.append("execution.refresh_cache=true")
    try:
        return load_config(config, extra)
    except ConfigError as error:
        _fail(str(error))
        raise  # unreachable


def _workspace(workspace: Path | None) -> Workspace:
    try:
        return Workspace.open(workspace or Path("workspace"))
    except WorkspaceError as error:
        _fail(str(error))
        raise


def _print_summary(summary: dict[str, Any]) -> None:
    metrics = summary.get("metrics", {})
    typer.echo("")
    typer.echo("stages: " + ", ".join(f"{k}={v}" for k, v in summary["states"].items()))
    typer.echo(f"pipeline time: {summary['seconds']:.1f} s")
    if metrics:
        typer.echo(
            f"test accuracy: {metrics['accuracy']:.3f} (95% CI {metrics['accuracy_ci_low']:.3f}-"
            f"{metrics['accuracy_ci_high']:.3f}, n={int(metrics['n_test'])}), ROC-AUC {metrics['roc_auc']:.3f}"
        )
    for note in summary.get("notes", []):
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW if ("minimum" in note or "[warn]" in note) else None)
    typer.echo(f"report: {summary['report']}")
    typer.echo(f"model registry: {summary['registry']}")
    typer.echo(
        f"MLflow run {summary['mlflow_run_id']}: open the UI with `aidetect ui --workspace {summary['workspace']}`"
    )


def _before_flows(cfg: PipelineConfig) -> None:
    """What a flow-running command does first: exit at once if another run holds the workspace, then start
    Prefect's temporary server (unless PREFECT_API_URL names one) tied to this process: it stops when we do."""
    from flows.lifeline import temporary_server
    from pipeline_lib.workspace import check_unlocked

    root = Path(cfg.execution.workspace).expanduser().resolve()
    if (root / ".aidetect-workspace").is_file():
        check_unlocked(Workspace(root))
    temporary_server(TEMPORARY_SERVER_START_S)


def _run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    from flows.pipeline import run_pipeline
    from pipeline_lib.models import WeightsNotFoundError
    from pipeline_lib.split import SplitError

    _before_flows(cfg)
    try:
        return run_pipeline(cfg)
    except ReviewPending as error:
        _fail(str(error), code=3)
        raise
    except (ConfigError, SplitError, WeightsNotFoundError, WorkspaceError) as error:
        _fail(f"{type(error).__name__}: {error}")
        raise
    except Exception as error:
        if _review_timed_out(error):  # Prefect fails a run whose pause expired before the gate can say more
            _fail(
                "the review gate timed out with images still pending: decide them with "
                f"`aidetect review serve --workspace {cfg.execution.workspace}`, then run `aidetect run` again",
                code=3,
            )
        raise


def _review_timed_out(error: BaseException) -> bool:
    """True if error (or its cause) is a pause that expired: a FlowPauseTimeout or a run 'never resumed'."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "FlowPauseTimeout" or "never resumed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@app.command()
def run(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    refresh_cache: RefreshOpt = False,
    reshuffle: Annotated[
        bool, typer.Option("--reshuffle", help="Start a new split registry version (after changing split ratios/seed).")
    ] = False,
):
    """Run the whole pipeline (cached stages are skipped)."""
    extra = list(set_ or []) + (["execution.reshuffle_splits=true"] if reshuffle else [])
    _print_summary(_run_pipeline(_config(config, workspace, extra, refresh_cache)))


@app.command()
def crawl(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, set_: SetOpt = None, refresh_cache: RefreshOpt = False
):
    """Crawl and ingest only: grow the catalog."""
    from flows.pipeline import crawl_flow

    cfg = _config(config, workspace, set_, refresh_cache)
    _before_flows(cfg)
    result = crawl_flow(cfg)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("import")
def import_folder(
    folder: Annotated[Path, typer.Argument(help="Folder of images, e.g. Midjourney or Stable Diffusion output.")],
    label: Annotated[str, typer.Option("--label", help="real or ai")],
    group_by: Annotated[
        str, typer.Option("--group-by", help="folder | pattern:REGEX | csv:FILE (columns file,group)")
    ] = "folder",
    generator: Annotated[str, typer.Option(help="e.g. midjourney, stable-diffusion")] = "unknown",
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Add a folder of local images to the workspace (kept as a source of every later run) and ingest it now."""
    from pydantic import ValidationError

    from flows.pipeline import crawl_flow
    from pipeline_lib.config import FolderSource
    from pipeline_lib.imports import add_import

    try:
        source = FolderSource(path=folder.resolve(), label=label, group_by=group_by, generator=generator)
    except ValidationError as error:
        fields = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        _fail(f"invalid import: {fields}")
        raise
    cfg = _config(
        config, workspace, list(set_ or []) + ["sources.search=[]", "sources.urls=[]", "sources.folders=[]"], False
    )
    _before_flows(cfg)
    try:
        add_import(Workspace.create(cfg.execution.workspace), source)
    except ConfigError as error:
        _fail(str(error))
    result = crawl_flow(cfg)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def demo(
    workspace: Annotated[Path, typer.Option("--workspace", "-w")] = Path("demo-workspace"),
    config: ConfigOpt = None,
    persons: Annotated[int, typer.Option(help="Synthetic persons per class.")] = 30,
    set_: SetOpt = None,
    refresh_cache: RefreshOpt = False,
):
    """Offline demo on synthetic data: loopback crawl with icrawler, folder import, train, report."""
    from pipeline_lib import demo_data

    workspace = workspace.resolve()
    data_root = workspace / "demo-data"
    typer.echo(f"generating synthetic demo data in {data_root} (not real people: drawn faces)")
    dataset = demo_data.generate_demo_dataset(data_root, n_persons_per_class=persons)
    with demo_data.search_site(dataset, port=DEMO_PORT) as endpoint:
        typer.echo(f"serving the 'real' class on a loopback search page: {endpoint}")
        try:
            base = read_yaml_mapping(DEMO_CONFIG)
            overlay = read_yaml_mapping(config) if config else {}
        except ConfigError as error:
            _fail(str(error))
            raise
        data = merge_mappings(base, demo_data.demo_config_dict(dataset, endpoint, workspace))
        data = merge_mappings(data, {k: v for k, v in overlay.items() if k != "sources"})
        extra = list(set_ or []) + (["execution.refresh_cache=true"] if refresh_cache else [])
        try:
            cfg = build_config(data, extra, origin="demo config")
        except ConfigError as error:
            _fail(str(error))
            raise
        summary = _run_pipeline(cfg)
    _print_summary(summary)


@app.command()
def status(workspace: WorkspaceOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False):
    """Catalog counts by status, label and split; pending reviews; last runs."""
    from pipeline_lib import tracking
    from pipeline_lib.status import workspace_status

    ws = _workspace(workspace)
    info = workspace_status(ws)
    info["runs"] = (
        tracking.recent_runs(tracking.tracking_uri(None, ws), "aidetect") if (ws.root / "mlflow.db").exists() else []
    )
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(f"workspace: {info['workspace']} (latest stage: {info['stage']})")
    typer.echo(f"images: {info['images']}")
    for key in ("status", "label", "split"):
        if key in info:
            typer.echo(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in info[key].items()))
    typer.echo(f"review decisions: {info.get('decisions', 0)}, undecided: {info.get('undecided', 0)}")
    for run_info in info["runs"]:
        typer.echo(
            f"  run {run_info['run_id'][:8]} {run_info['status']} {run_info['start_time']} "
            f"acc={run_info['test_accuracy']}"
        )


@review_app.command("status")
def review_status(workspace: WorkspaceOpt = None):
    """How many images are decided, approved, rejected and still undecided."""
    from pipeline_lib.review import read_decisions
    from pipeline_lib.status import workspace_status

    ws = _workspace(workspace)
    decisions = read_decisions(ws).values()
    approved = sum(d.decision == "approve" for d in decisions)
    typer.echo(
        f"approved: {approved}, rejected: {len(decisions) - approved}, "
        f"undecided: {workspace_status(ws).get('undecided', 0)}"
    )


@review_app.command("export")
def review_export(target: Path, workspace: WorkspaceOpt = None):
    """Write undecided images to a CSV (sha256,label,group,url,decision,reason) to fill in."""
    from pipeline_lib.catalog import STATUS_OK, read_parquet_file
    from pipeline_lib.review import read_decisions
    from pipeline_lib.status import latest_snapshot

    ws = _workspace(workspace)
    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")
    table = read_parquet_file(snapshot)
    decided = read_decisions(ws)
    todo = table[(table["status"] == STATUS_OK) & ~table["sha256"].isin(decided)].drop_duplicates("sha256")
    todo[["sha256", "label", "group", "url"]].assign(decision="", reason="").to_csv(target, index=False)
    typer.echo(f"{len(todo)} undecided image(s) written to {target}; fill decision with approve/reject")


@review_app.command("apply")
def review_apply(csv_file: Path, workspace: WorkspaceOpt = None, reviewer: str = "csv"):
    """Append the decisions of a CSV (sha256,decision[,reason]) to review/decisions.jsonl."""
    from pipeline_lib.catalog import read_parquet_file
    from pipeline_lib.review import append_decisions, read_decisions_csv, set_aside_cut_off_line
    from pipeline_lib.status import latest_snapshot

    ws = _workspace(workspace)
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
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import runner_deployments

    api = PREFECT_API_URL.value()
    if not api:
        _fail(
            "schedules need a Prefect server, and PREFECT_API_URL is not set. Start one with `prefect server start`, "
            "then `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` and run `aidetect serve` again."
        )
    if not _server_is_up(api):
        _fail(f"no Prefect server answers at {api}: start it with `prefect server start` (or fix PREFECT_API_URL)")
    if config is not None and not config.is_file():
        _fail(f"config file not found: {config}")
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
):
    """Serve the review page for the undecided images; 'finish review' resumes a waiting run if there is one."""
    from pipeline_lib import review_server
    from pipeline_lib.catalog import read_parquet_file
    from pipeline_lib.review import read_waiting
    from pipeline_lib.status import latest_snapshot

    ws = _workspace(workspace)
    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")

    def on_finish(item: review_server.FinishIn) -> review_server.FinishResult:
        waiting = read_waiting(ws)
        if waiting is None:
            return review_server.FinishResult(f"decisions saved; run `aidetect run --workspace {ws.root}` again")
        from flows.review_gate import resume_run

        try:
            accepted, message = resume_run(str(waiting["flow_run_id"]), item.approve_remaining, item.note)
        except Exception as error:  # noqa: BLE001 - shown on the page
            return review_server.FinishResult(f"decisions saved; could not resume the waiting run: {error}")
        return review_server.FinishResult(message, accepted)

    token = review_server.access_token(host)
    app_ = review_server.create_app(ws, read_parquet_file(snapshot), on_finish, reviewer="web", token=token)
    if token:
        typer.secho(f"warning: {review_server.exposure_warning(host)}", fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"review page: {review_server.page_url(f'http://{shown}:{port}/', token)}  (Ctrl-C to stop)")
    review_server.serve_forever(app_, host, port)


@review_app.command("done")
def review_done(
    workspace: WorkspaceOpt = None,
    approve_remaining: Annotated[bool, typer.Option(help="Approve every image still undecided.")] = False,
    note: str = "",
):
    """Resume the flow run that waits at the review gate (needs the Prefect server the run uses)."""
    from flows.review_gate import resume_run
    from pipeline_lib.review import read_waiting

    ws = _workspace(workspace)
    try:
        waiting = read_waiting(ws)
    except ReviewError as error:
        _fail(str(error))
    if waiting is None:
        _fail(f"no flow run waits at the review gate of {ws.root}; run `aidetect run --workspace {ws.root}`")
    try:
        accepted, message = resume_run(str(waiting["flow_run_id"]), approve_remaining, note)
    except Exception as error:  # noqa: BLE001 - a clear message instead of a traceback
        _fail(f"could not resume flow run {waiting['flow_run_id']}: {error} (is PREFECT_API_URL the run's server?)")
    if not accepted:
        _fail(message)
    typer.echo(message)


@app.command()
def doctor(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Repair what is safe (set damaged files aside).")] = False,
    deep: Annotated[bool, typer.Option("--deep", help="Also hash every stored file against its name.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
):
    """Check a workspace (snapshots, store against the crawl log, decisions, checkpoints, mlflow.db, leftovers of
    killed runs) and, with --repair, repair what is safe. Exit 0 when nothing is left to fix, 2 otherwise."""
    from dataclasses import asdict

    from pipeline_lib.doctor import Doctor, diagnose
    from pipeline_lib.workspace import workspace_lock

    cfg = _config(config, workspace, None, False)
    ws = _workspace(cfg.execution.workspace)
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


@app.command()
def ui(workspace: WorkspaceOpt = None, port: int = 5000, host: str = "127.0.0.1"):
    """Start the MLflow UI on the workspace's tracking store (and say how to start Prefect's)."""
    ws = _workspace(workspace)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    typer.echo(f"MLflow UI: http://{host}:{port}  (store {uri})")
    typer.echo("Prefect UI: run `prefect server start` in another shell, then http://127.0.0.1:4200")
    command = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    command += ["--default-artifact-root", (ws.root / "mlartifacts").as_uri()]
    os.execv(command[0], command) if os.name == "posix" else subprocess.run(command, check=False)


def _predict_model(
    spec: str, config: Path | None, workspace: Path | None, trust_pickle: bool = False
) -> tuple[Any, dict[str, Any]]:
    """(model, meta with image_size) from a checkpoint path, 'champion' or an MLflow run id; exit 2 if not found.

    Registered models are rebuilt from their state_dict (weights only); unpickling only with trust_pickle.
    """
    from pipeline_lib import models, tracking

    path = Path(spec).expanduser()
    if path.suffix == ".pt" or path.is_file():
        try:
            return models.load_model(path)
        except (FileNotFoundError, models.CheckpointError) as error:
            _fail(f"model not found: {error}")
    cfg = _config(config, workspace, None, False)
    ws = None if cfg.tracking.uri else _workspace(cfg.execution.workspace)
    uri = cfg.tracking.uri or tracking.tracking_uri(None, ws)
    trust = trust_pickle or cfg.tracking.trust_pickle
    try:
        if spec == "champion":
            model, size = tracking.load_champion(uri, cfg.tracking.registered_model, trust)
            calibration = tracking.champion_calibration(uri, cfg.tracking.registered_model)
        else:
            model, size = tracking.load_run_model(uri, spec, trust)
            calibration = None
    except tracking.ModelNotFoundError as error:
        _fail(f"model not found: {error}")
        raise
    return model, {"image_size": size, "model": spec, "calibration": calibration}


def _print_predictions(rows: list[Any]) -> None:
    """A plain table: p_ai, label, verdict, path (and the error or CAM file)."""
    typer.echo(f"{'p_ai':>6}  {'label':<5}  {'verdict':<9}  path")
    for row in rows:
        if row.error:
            typer.secho(f"{'-':>6}  {'error':<5}  {'-':<9}  {row.path}: {row.error}", fg=typer.colors.RED)
        else:
            cam = f"  (cam: {row.cam})" if row.cam else ""
            typer.echo(f"{row.p_ai:6.3f}  {row.label:<5}  {row.verdict:<9}  {row.path}{cam}")


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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0)] = 0.5,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow unpickling a registered model that carries no state_dict (runs code from the tracking store).",
        ),
    ] = False,
):
    """p_ai, label and verdict (ai / real / uncertain, band from config calibration) per image.

    The temperature and normalisation of training are applied: from a checkpoint's <model>.calibration.json, or from
    the champion's model-version tag. Files ingest would refuse by their header (config ingest: max_pixels,
    min_side, animated) are not decoded and get an error row.
    Exit 1 if some file could not be read or was refused, 2 if the model or images are missing.
    """
    from pipeline_lib.predict import collect_paths, parse_calibration, predict_files, read_calibration

    if not collect_paths(paths):
        _fail("no image files found in: " + ", ".join(map(str, paths)))
    loaded, meta = _predict_model(model, config, workspace, trust_pickle)
    predict_config = _config(config, workspace, None, False)
    band_config = predict_config.calibration
    checkpoint = Path(model).expanduser()
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
            ingest=predict_config.ingest,
        )
    except ValueError as error:
        _fail(str(error))
        raise
    if as_json:
        typer.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        _print_predictions(rows)
    if any(row.error for row in rows):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
