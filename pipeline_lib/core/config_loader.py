"""Reading a PipelineConfig: YAML files, 'section.key=value' overrides, deep merges, paths made absolute, and
validation errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline_lib.core.config import ConfigError, PipelineConfig


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        elif "input" in item and item["type"] not in ("missing",):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return f"invalid configuration in {origin}:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'train.epochs=3' into (['train', 'epochs'], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # keep on/off/yes/no as words, not YAML 1.1 booleans
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """Return a copy of data with data[parts...] = value (nested dicts created as needed)."""
    result = dict(data)
    head, rest = parts[0], parts[1:]
    if not rest:
        result[head] = value
        return result
    child = result.get(head) or {}
    if not isinstance(child, dict):
        raise ConfigError(f"override {'.'.join(parts)}: {head} is not a section")
    result[head] = _apply_override(child, rest, value)
    return result


def merge_mappings(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overlay onto base (overlay wins; nested dicts merged); neither is modified."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: Path | str) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError if missing, malformed or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], overrides: list[str] | None = None, origin: str = "config") -> PipelineConfig:
    """Validate a config mapping plus 'a.b=value' overrides into a PipelineConfig."""
    for text in overrides or []:
        parts, value = parse_override(text)
        data = _apply_override(data, parts, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, origin)) from None


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (None = defaults) and apply overrides; relative paths resolve from the file."""
    if path is None:
        return build_config({}, overrides, origin="defaults")
    path = Path(path)
    config = build_config(read_yaml_mapping(path), overrides, origin=str(path))
    return resolve_paths(config, path.parent)


def resolve_paths(config: PipelineConfig, base: Path) -> PipelineConfig:
    """Make the config's relative file paths absolute against base (the config file's folder)."""

    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (base / p).resolve()

    sources = config.sources.model_copy(
        update={
            "search": [s.model_copy(update={"keywords_file": fix(s.keywords_file)}) for s in config.sources.search],
            "urls": [s.model_copy(update={"csv": fix(s.csv)}) for s in config.sources.urls],
            "folders": [s.model_copy(update={"path": fix(s.path)}) for s in config.sources.folders],
        }
    )
    return config.model_copy(update={"sources": sources})
