"""Pretrained weights files: their errors, where they are kept (TORCH_HOME's checkpoints), and hash-checked downloads.

Every download is checked against a sha256 before it reaches its final name: the one pinned in code (a full digest
or the prefix a publisher puts in its file names), else the prefix a mirror's file name carries, else the one the
server announces for the file (Hugging Face sends the sha256 of an LFS file as X-Linked-Etag). A file no sha256 is
known for is not downloaded.
"""

from __future__ import annotations

import http.client
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")  # the sha256 prefix torch.hub checks in a weights file name
ANNOUNCE_TIMEOUT_S = 30.0


class WeightsNotFoundError(FileNotFoundError):
    """Initial weights are not on disk and could not be fetched; the message names the file, URL and command."""


class WeightsError(ValueError):
    """A weights file is unreadable or does not fit the model."""


@dataclass(frozen=True)
class WeightsFile:
    """Published weights in TORCH_HOME's cache: where, their sha256, and whether this call downloaded them."""

    path: Path
    sha256: str
    downloaded: bool


def checkpoints_dir() -> Path:
    """TORCH_HOME's checkpoints folder (torch.hub's cache), where every published weights file is kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def name_prefix(file_name: str) -> str:
    """The sha256 prefix a file name carries (resnet50-11ad3fa6.pth -> 11ad3fa6), or ""."""
    match = HASH_PREFIX.search(file_name)
    return match.group(1) if match else ""


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file, loaded weights-only (tensors, no code); a checkpoint's state_dict is
    unwrapped. WeightsError naming the file when it is unreadable or holds something else."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad files
        raise WeightsError(f"weights file {path} is not a readable torch state_dict: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"weights file {path} must hold a state_dict (a dict of tensors), got {type(data).__name__}")
    return data


def mismatch_message(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Describe missing, unexpected and wrongly shaped keys (a few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {list(found[k].shape)} != {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{title}: {', '.join(items[:5])}{more}")
    return f"weights file {path} does not fit the model: " + "; ".join(parts)


def not_cached_message(
    kind: str, name: str, path: Path, url: str, reason: str, *, mirror_hint: str = "", local_file: str = "weights file"
) -> str:
    """What to do when the kind ("ImageNet", "pretrained") weights of name are not in TORCH_HOME's cache: the file,
    the URL, the command that fetches them, and the settings that do without them."""
    return (
        f"{kind} weights for {name} are not in TORCH_HOME's cache: {path} ({reason}). Fetch them with "
        f"`aidetect weights fetch {name}`, which downloads {url} (hash-checked) to that file; offline, download the "
        f"file on another machine and copy it there (or set TORCH_HOME{mirror_hint}). Or set train.weights to a local "
        f"{local_file}, or train.weights=none to start from random weights."
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib's signature
        return None  # the 3xx answer itself carries the hub's headers


def announced_sha256(url: str, timeout: float = ANNOUNCE_TIMEOUT_S) -> str:
    """The sha256 the server announces for url without downloading it (X-Linked-Etag, else a 64-hex ETag), or "".

    A HEAD request that does not follow redirects: Hugging Face answers /resolve/ URLs with a redirect to its CDN
    whose own headers no longer name the file's hash. Network errors propagate (the caller names the file).
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "aidetect"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as answer:
            headers = answer.headers
    except urllib.error.HTTPError as error:  # a 3xx (not followed) still carries the headers we want
        if error.code >= 400:
            raise
        headers = error.headers
    for name in ("X-Linked-Etag", "ETag"):
        value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
        if SHA256_HEX.match(value):
            return value
    return ""


def download_checked(url: str, target: Path, sha256: str, progress: bool = True) -> None:
    """Download url to target (atomically, through torch.hub) if the bytes' sha256 starts with sha256.

    Raises WeightsError on a mismatch (nothing is stored), OSError / HTTPException when the download fails.
    """
    if len(sha256) < 8:
        raise ValueError(f"a download needs a sha256 (or a prefix of 8+ hex digits) to check, got {sha256!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s (sha256 %s...)", url, target, sha256[:16])
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=progress)
    except RuntimeError as error:
        if "hash" not in str(error):
            raise
        raise WeightsError(f"download of {url} rejected, nothing was stored: {error}") from None


def is_network_error(error: BaseException) -> bool:
    """Whether a download failed for the network's sake (offline, refused, timed out, cut off)."""
    return isinstance(error, OSError | http.client.HTTPException)
