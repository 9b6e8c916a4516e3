"""What a crawl's search and URL-list sources name: keywords (inline and from .txt/.csv files) and URL lists
(url,label,group CSVs), read from the user's UTF-8 files and checked, with file and line in every error."""

from __future__ import annotations

import csv
import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pipeline_lib.core.config import LABELS, SearchSource

MAX_KEYWORD_LENGTH = 100  # characters of a search keyword or URL-list group


def read_utf8(path: Path, what: str) -> str:
    """A user's text file (UTF-8, BOM allowed); FileNotFoundError or ValueError naming what and where."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text ({error})") from None


def clean_keyword(text: str) -> str:
    """text in Unicode NFC without surrounding white space (how keywords and group names are compared)."""
    return unicodedata.normalize("NFC", text).strip()


def read_keywords(path: Path) -> list[str]:
    """Keywords from a UTF-8 .txt (one per line, '#' comments) or .csv (a `keyword` column)."""
    path = Path(path)
    text = read_utf8(path, "keywords file")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "keyword" not in (reader.fieldnames or []):
            raise ValueError(f"keywords file {path} has no 'keyword' column (columns: {reader.fieldnames})")
        values = [row.get("keyword") or "" for row in reader]
    else:
        values = [line for line in text.splitlines() if not line.strip().startswith("#")]
    return [kw for kw in map(clean_keyword, values) if kw]


def check_keyword_length(keyword: str, where: str) -> str:
    """The keyword, or ValueError naming where it came from when it is longer than MAX_KEYWORD_LENGTH."""
    if len(keyword) > MAX_KEYWORD_LENGTH:
        raise ValueError(
            f"{where}: keyword {keyword[:40]!r}... is {len(keyword)} characters long; the limit is "
            f"{MAX_KEYWORD_LENGTH} (a keyword names a group, and metrics and tables are named after it)"
        )
    return keyword


def source_keywords(source: SearchSource, index: int) -> list[str]:
    """Inline keywords plus those of keywords_file, de-duplicated in order; ValueError if there are none or one is
    longer than MAX_KEYWORD_LENGTH."""
    where = f"sources.search[{index}]"
    keywords = [check_keyword_length(clean_keyword(k), f"{where}.keywords") for k in source.keywords]
    if source.keywords_file is not None:
        keywords += [check_keyword_length(k, str(source.keywords_file)) for k in read_keywords(source.keywords_file)]
    unique = list(dict.fromkeys(k for k in keywords if k))
    if not unique:
        empty = f" (the keywords file {source.keywords_file} holds none)" if source.keywords_file else ""
        raise ValueError(f"{where} has no keywords (set keywords or keywords_file){empty}")
    return unique


@dataclass(frozen=True)
class UrlEntry:
    """One line of a URL list."""

    url: str
    label: str
    group: str


def read_url_list(path: Path) -> list[UrlEntry]:
    """Rows of a url,label,group CSV; ValueError naming file and line for a missing column, bad label or empty url."""
    path = Path(path)
    text = read_utf8(path, "URL list")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("url", "label", "group") if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}, line 1: missing column(s) {', '.join(missing)} (header must be url,label,group)")
    entries: dict[str, UrlEntry] = {}
    for row in reader:
        line = reader.line_num
        url, label = (row.get("url") or "").strip(), (row.get("label") or "").strip()
        group = clean_keyword(row.get("group") or "")
        if not url:
            raise ValueError(f"{path}, line {line}: empty url")
        if label not in LABELS:
            raise ValueError(f"{path}, line {line}: label {label!r} must be one of {', '.join(LABELS)}")
        if not group:
            raise ValueError(f"{path}, line {line}: empty group")
        check_keyword_length(group, f"{path}, line {line}")
        earlier = entries.setdefault(url, UrlEntry(url, label, group))
        if (earlier.label, earlier.group) != (label, group):
            raise ValueError(
                f"{path}, line {line}: {url} was listed before with label/group {earlier.label}/{earlier.group}"
            )
    return list(entries.values())
