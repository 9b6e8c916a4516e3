"""Stage cache keys: the named parts a stage's result depends on, and one digest of them.

Every cached stage is keyed the same way (tasks/caching.py turns this into a Prefect cache policy):

- `input.<parameter>`: each argument of the stage's task: a Ref by its content digest, a config section by its
  JSON, a list of chunk rows by their JSON. Parameters in UNKEYED (the workspace root, chunk sizes, resume) are
  left out: they never change a result.
- `file.<where>`: the content of every file a config section only names (keyword lists, URL lists, `csv:` group
  files, a folder's listing, a state_dict given as train.weights): see NAMED_FILES.
- `code.task` and `code.<module>`: the task function with the definitions it uses in its own package, and each
  pipeline_lib module it reaches, followed through their imports (code_index.CodeIndex). Comments, docstrings and
  formatting do not count (the digest is over the syntax tree).
- `lib.<distribution>`: the versions of the libraries in code_index.LIBRARIES that this code imports (torch,
  torchvision, Pillow, ImageHash, grad-cam, numpy): their output is what a stage stores.

The key is the digest of all parts. The parts themselves are logged on the stage's MLflow run, with the names of
those that changed since the stage's previous run, so a user can see why a stage ran again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline_lib.core.code_index import CacheKeyError
from pipeline_lib.core.config import SourcesConfig, TrainConfig
from pipeline_lib.core.workspace import Ref, digest_of, file_sha256, listing_digest

log = logging.getLogger(__name__)

DISPLAY_LIMIT = 500  # characters of a part's value shown on the stage's MLflow run
# Parameters that never change a stage's result: where the workspace is, how work is chunked, whether an interrupted
# training continues, and where live progress and the run's crawl-health notes go (StageRecorder.run's live arguments).
UNKEYED: frozenset[str] = frozenset({"root", "chunk_size", "resume", "progress", "health_notes"})


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _plain(value: Any) -> Any:
    """A JSON-ready form of a task input: Refs by digest, pydantic models by their fields, dataclasses by fields."""
    if isinstance(value, Ref):
        return {"ref": value.digest}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise CacheKeyError(
        f"a stage input of type {type(value).__name__} has no content digest: pass a Ref, a config section, "
        "a dataclass or plain values (see pipeline_lib/core/cachekey.py)"
    )


def value_text(value: Any) -> str:
    """The canonical text of one input: a Ref's digest, else sorted JSON of its plain form."""
    if isinstance(value, Ref):
        return value.digest
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _file_text(path: Path | None) -> str:
    """sha256 of a file the config names, or 'missing' (the stage then fails with its own clear error)."""
    if path is None:
        return "none"
    return file_sha256(path) if Path(path).is_file() else "missing"


def _group_csv(folder: Path, group_by: str) -> Path | None:
    if not group_by.startswith("csv:"):
        return None
    csv_path = Path(group_by.removeprefix("csv:"))
    return csv_path if csv_path.is_absolute() else folder / csv_path


def source_files(sources: SourcesConfig) -> dict[str, str]:
    """Digests of the files sources names: keyword files, URL lists, folders' listings and their group CSVs."""
    parts: dict[str, str] = {}
    for index, search in enumerate(sources.search):
        if search.keywords_file is not None:
            parts[f"file.search.{index}.keywords_file"] = _file_text(search.keywords_file)
    for index, urls in enumerate(sources.urls):
        parts[f"file.urls.{index}.csv"] = _file_text(urls.csv)
    for index, folder in enumerate(sources.folders):
        parts[f"file.folders.{index}.listing"] = listing_digest([Path(folder.path)])
        group_csv = _group_csv(Path(folder.path), folder.group_by)
        if group_csv is not None:
            parts[f"file.folders.{index}.group_csv"] = _file_text(group_csv)
    return parts


def train_files(config: TrainConfig) -> dict[str, str]:
    """The digest of a state_dict file given as train.weights (names such as 'imagenet' are keyed as text)."""
    if config.weights in ("imagenet", "none"):
        return {}
    return {"file.train.weights": _file_text(Path(config.weights).expanduser())}


# Config sections that name files, and how to digest those files. A new config key that names a file or folder
# belongs here, so that a change of the file's content changes the key of every stage that takes the section.
NAMED_FILES: dict[type, Callable[[Any], dict[str, str]]] = {
    SourcesConfig: source_files,
    TrainConfig: train_files,
}


def input_parts(inputs: Mapping[str, Any]) -> dict[str, str]:
    """`input.<name>` per keyed input, plus `file.*` for the files that config sections among them name."""
    parts: dict[str, str] = {}
    for name, value in sorted(inputs.items()):
        if name in UNKEYED:
            continue
        parts[f"input.{name}"] = value_text(value)
        describe = NAMED_FILES.get(type(value))
        if describe is not None:
            parts |= describe(value)
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class StageKey:
    """The named parts of one stage's cache key and their digest."""

    parts: Mapping[str, str]

    @property
    def digest(self) -> str:
        """The key: a digest of every part, by name."""
        return digest_of(*(f"{name}={value}" for name, value in sorted(self.parts.items())))


def shown_parts(key: StageKey, limit: int = DISPLAY_LIMIT) -> dict[str, str]:
    """The parts as logged: a value longer than limit is shown as its digest and length."""
    return {
        name: value if len(value) <= limit else f"sha256:{digest_of(value)[:16]} ({len(value)} chars)"
        for name, value in sorted(key.parts.items())
    }


def changed_parts(current: Mapping[str, str], earlier: Mapping[str, str] | None) -> str:
    """A one-line answer to "why did this stage run again": the names of the parts that changed."""
    if earlier is None:
        return "(no earlier run of this stage)"
    names = sorted(n for n in set(current) | set(earlier) if current.get(n) != earlier.get(n))
    return ", ".join(names) or "(none: the key is unchanged)"


def stage_key(fixed: Mapping[str, str], inputs: Mapping[str, Any]) -> StageKey:
    """The key of one task run: its fixed parts (task, code, libraries) and the parts of its inputs."""
    return StageKey(dict(fixed) | input_parts(inputs))
