"""Entry points for scheduled deployments (prefect.yaml): they take a config path, so a schedule needs no Python."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import crawl_flow, pipeline
from pipeline_lib.config import load_config


@flow(name="aidetect-scheduled-retrain")
def retrain(config_path: str = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Re-run the whole pipeline from a config file; cached stages are skipped, new images flow through."""
    return pipeline(load_config(config_path, overrides or []))


@flow(name="aidetect-scheduled-recrawl")
def recrawl(config_path: str = "configs/default.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Crawl and ingest only; the crawl stage's cache expires after sources.recrawl_after_hours."""
    return crawl_flow(load_config(config_path, overrides or []))
