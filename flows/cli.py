"""The `aidetect` command: parses options, builds the config, calls flows. No logic of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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

app = typer.Typer(help="aidetect: build and maintain a detector of AI-generated images.", no_args_is_help=True)
review_app = typer.Typer(help="Manual review: counts, bulk decisions from CSV.", no_args_is_help=True)
app.add_typer(review_app, name="review")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in defaults).")]
WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. --set train.epochs=3")]
RefreshOpt = Annotated[bool, typer.Option("--refresh-cache", help="Recompute every stage.")]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_PORT = 47811  # loopback port of the demo's search site; stable so that a second demo run is fully cached


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
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {summary['report']}")
    typer.echo(f"model registry: {summary['registry']}")
    typer.echo(
        f"MLflow run {summary['mlflow_run_id']}: open the UI with `aidetect ui --workspace {summary['workspace']}`"
    )


def _run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    from flows.pipeline import pipeline

    try:
        return pipeline(cfg)
    except ReviewPending as error:
        _fail(str(error), code=3)
        raise


@app.command()
def run(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, set_: SetOpt = None, refresh_cache: RefreshOpt = False
):
    """Run the whole pipeline (cached stages are skipped)."""
    _print_summary(_run_pipeline(_config(config, workspace, set_, refresh_cache)))


@app.command()
def crawl(
    config: ConfigOpt = None, workspace: WorkspaceOpt = None, set_: SetOpt = None, refresh_cache: RefreshOpt = False
):
    """Crawl and ingest only: grow the catalog."""
    from flows.pipeline import crawl_flow

    result = crawl_flow(_config(config, workspace, set_, refresh_cache))
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
    import pandas as pd

    from pipeline_lib.catalog import STATUS_OK
    from pipeline_lib.review import read_decisions
    from pipeline_lib.status import latest_snapshot

    ws = _workspace(workspace)
    snapshot = latest_snapshot(ws, "dedup")
    if snapshot is None:
        _fail("nothing to review yet: run the pipeline (or `aidetect crawl`) first")
    table = pd.read_parquet(snapshot)
    decided = read_decisions(ws)
    todo = table[(table["status"] == STATUS_OK) & ~table["sha256"].isin(decided)].drop_duplicates("sha256")
    todo[["sha256", "label", "group", "url"]].assign(decision="", reason="").to_csv(target, index=False)
    typer.echo(f"{len(todo)} undecided image(s) written to {target}; fill decision with approve/reject")


@review_app.command("apply")
def review_apply(csv_file: Path, workspace: WorkspaceOpt = None, reviewer: str = "csv"):
    """Append the decisions of a CSV (sha256,decision[,reason]) to review/decisions.jsonl."""
    import pandas as pd

    from pipeline_lib.review import append_decisions, read_decisions_csv
    from pipeline_lib.status import latest_snapshot

    ws = _workspace(workspace)
    snapshot = latest_snapshot(ws, "dedup")
    known = set(pd.read_parquet(snapshot)["sha256"]) if snapshot is not None else set()
    try:
        count = append_decisions(ws, read_decisions_csv(csv_file, reviewer), known)
    except ReviewError as error:
        _fail(f"nothing applied: {error}")
    typer.echo(f"{count} decision(s) recorded; run the pipeline again to continue")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
