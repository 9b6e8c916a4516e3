"""The catalog schema (one row per acquired file) and its immutable Parquet snapshots."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_lib.core.config import LABELS
from pipeline_lib.core.workspace import Ref, Workspace, atomic_write_bytes, bytes_sha256, file_sha256, has_content

log = logging.getLogger(__name__)

# name -> pandas dtype. Order is the column order of every snapshot.
COLUMNS: dict[str, str] = {
    "sha256": "string",  # content hash of the original bytes ("" when the download failed)
    "path": "string",  # relative to the workspace: store/... or quarantine/...
    "label": "string",  # real | ai
    "group": "string",  # person / keyword / prompt id: the split unit
    "source": "string",  # e.g. search:bing, urls:list.csv, folder:ai_images
    "url": "string",  # origin: http(s) URL or file:// path of the original
    "keyword": "string",
    "generator": "string",  # e.g. midjourney, stable-diffusion, camera, unknown
    "fetched_at": "datetime64[ns, UTC]",
    "width": "Int64",
    "height": "Int64",
    "format": "string",  # JPEG, PNG, WEBP, ...
    "mode": "string",  # PIL mode of the original (RGB, CMYK, P, LA, I;16 ...)
    "exif_orientation": "Int64",
    "n_bytes": "Int64",
    "status": "string",  # ok | invalid:<reason> | duplicate_of:<sha256> | rejected | pending_review
    "phash": "string",  # hex
    "dhash": "string",  # hex
    "cluster": "string",  # near-duplicate cluster id (the keeper's sha256), "" if alone
    "split": "string",  # train | val | test | "" (not assigned)
}

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_PENDING = "pending_review"
INVALID_PREFIX = "invalid:"
DUPLICATE_PREFIX = "duplicate_of:"
SPLITS: tuple[str, ...] = ("train", "val", "test")


class CatalogError(ValueError):
    """A catalog table breaks the schema, or a snapshot does not match its digest."""


def empty_catalog() -> pd.DataFrame:
    """A catalog with all columns and no rows."""
    return conform(pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in COLUMNS.items()}))


def new_rows(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build catalog rows from dicts; missing columns get empty defaults."""
    frame = pd.DataFrame(list(records))
    for name, dtype in COLUMNS.items():
        if name not in frame.columns:
            frame[name] = pd.Series([_default(dtype)] * len(frame), dtype=object)
    return conform(frame)


def _default(dtype: str) -> Any:
    if dtype == "string":
        return ""
    return pd.NA if dtype in ("Int64",) else pd.NaT


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with exactly the schema's columns and dtypes; raise CatalogError if impossible."""
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise CatalogError(f"catalog is missing columns: {', '.join(missing)}")
    extra = [name for name in frame.columns if name not in COLUMNS]
    if extra:
        raise CatalogError(f"catalog has unknown columns: {', '.join(map(str, extra))}")
    out = pd.DataFrame(index=range(len(frame)))
    for name, dtype in COLUMNS.items():
        column = frame[name].reset_index(drop=True)
        if dtype == "string":
            column = column.astype("string").fillna("")
        elif dtype.startswith("datetime"):
            column = pd.to_datetime(column, utc=True)
        out[name] = column.astype(dtype)
    bad = sorted(set(out["label"]) - set(LABELS))
    if bad:
        raise CatalogError(f"catalog label must be one of {LABELS}, got {bad}")
    return out


def is_invalid(status: pd.Series) -> pd.Series:
    """Boolean mask of rows whose status is invalid:<reason>."""
    return status.str.startswith(INVALID_PREFIX)


def usable(catalog: pd.DataFrame) -> pd.DataFrame:
    """Rows that may be trained on: status ok."""
    return catalog[catalog["status"] == STATUS_OK]


def write_table(workspace: Workspace, folder: str, name: str, table: pd.DataFrame) -> Ref:
    """Write any table as an immutable <folder>/<name>-<digest>.parquet snapshot and return its Ref."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False, engine="pyarrow")
    data = buffer.getvalue()
    digest = bytes_sha256(data)
    target = workspace.root / folder / f"{name}-{digest[:16]}.parquet"
    if not has_content(target, digest):  # absent, or damaged (truncated, edited): written again
        atomic_write_bytes(target, data)
    return Ref(workspace.relative(target), digest)


def read_table(workspace: Workspace, ref: Ref) -> pd.DataFrame:
    """Read a table snapshot, checking that its bytes still match the reference's digest."""
    path = ref.resolve(workspace)
    if not path.is_file():
        raise CatalogError(f"snapshot {path} is missing (re-run with --refresh-cache to rebuild it)")
    actual = file_sha256(path)
    if actual != ref.digest:
        raise CatalogError(
            f"snapshot {path} changed on disk: digest {actual[:12]} != {ref.digest[:12]} "
            "(re-run with --refresh-cache to rebuild it; `aidetect doctor` lists every damaged file)"
        )
    return read_parquet_file(path)


def read_parquet_file(path: Path) -> pd.DataFrame:
    """A Parquet file of the workspace; CatalogError naming the file when it is damaged or not Parquet."""
    try:
        return pd.read_parquet(path, engine="pyarrow")
    except FileNotFoundError:
        raise CatalogError(f"{path} is missing") from None
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError and others for damaged files
        raise CatalogError(
            f"{path} is damaged ({type(error).__name__}: {error}); `aidetect doctor --repair` sets it aside, "
            "then run again with --refresh-cache"
        ) from None


def write_snapshot(workspace: Workspace, stage: str, catalog: pd.DataFrame) -> Ref:
    """Write an immutable catalog snapshot catalog/<stage>-<digest>.parquet and return its Ref."""
    ref = write_table(workspace, "catalog", stage, conform(catalog))
    log.debug("catalog snapshot %s: %d rows", ref.path, len(catalog))
    return ref


def read_snapshot(workspace: Workspace, ref: Ref) -> pd.DataFrame:
    """Read a catalog snapshot (digest-checked) and conform it to the schema."""
    return conform(read_table(workspace, ref))


def counts(catalog: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Counts by status kind, label and split, for status output and MLflow."""
    kind = catalog["status"].str.split(":", n=1).str[0]
    ok = catalog[catalog["status"] == STATUS_OK]
    return {
        "status": {str(k): int(v) for k, v in kind.value_counts().sort_index().items()},
        "label": {str(k): int(v) for k, v in ok["label"].value_counts().sort_index().items()},
        "split": {str(k or "unassigned"): int(v) for k, v in ok["split"].value_counts().sort_index().items()},
    }
