"""Offline demo data: a SYNTHETIC data set (faces drawn by demo_faces, not real people) and a loopback Bing-like
search site that serves its real class.

Nothing is downloaded and nobody real is depicted. Duplicates, near-duplicates and corrupt files are injected to
exercise the pipeline.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pipeline_lib.core.workspace import atomic_write_bytes, atomic_write_text, bytes_sha256, file_sha256
from pipeline_lib.ops.demo_faces import class_files, near_duplicate

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SITE_DIR = "site"
AI_DIR = "ai"
CORRUPT_HTML = (
    b"<!doctype html><html><head><title>Image removed</title></head>"
    b"<body><p>This image is no longer available.</p></body></html>\n"
)


@dataclass(frozen=True)
class DemoDataset:
    """A generated SYNTHETIC demo data set: served real-class files and a folder of AI-class files."""

    root: Path
    site_dir: Path  # <keyword>/<file>.jpg, served by search_site (the "real" class)
    ai_dir: Path  # <prompt>/<file>.png, imported as a folder source (the "ai" class)
    keywords: list[str]  # real person keywords, e.g. person-01
    n_real_images: int  # clean originals (duplicates and corrupt files are counted separately)
    n_ai_images: int
    n_exact_duplicates: int
    n_near_duplicates: int
    n_corrupt: int


def _first_in(files: dict[str, bytes], folder: str) -> str:
    return sorted(name for name in files if name.startswith(folder + "/"))[0]


def _injections(
    real: dict[str, bytes], ai: dict[str, bytes], n_persons: int
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Exact duplicates, near-duplicates and corrupt files, each kept inside one group."""
    person = [f"person-{i % n_persons + 1:02d}" for i in range(3)]
    prompt = [f"prompt-{i % n_persons + 1:02d}" for i in range(3)]
    extra_real: dict[str, bytes] = {}
    extra_ai: dict[str, bytes] = {}
    # exact duplicates: same bytes, second name in the same group
    extra_real[f"{person[0]}/dup-01.jpg"] = real[_first_in(real, person[0])]
    extra_ai[f"{prompt[0]}/dup-01.png"] = ai[_first_in(ai, prompt[0])]
    # near-duplicates: resized to 90%, re-encoded (JPEG at another quality / PNG)
    extra_real[f"{person[1]}/near-01.jpg"] = near_duplicate(real[_first_in(real, person[1])], "JPEG", 90)
    extra_ai[f"{prompt[1]}/near-01.png"] = near_duplicate(ai[_first_in(ai, prompt[1])], "PNG", 95)
    # corrupt: truncated JPEG and an HTML page named .jpg on the site; an empty PNG in the AI folder
    source = real[_first_in(real, person[2])]
    extra_real[f"{person[2]}/broken-01.jpg"] = source[: len(source) * 6 // 10]
    extra_real[f"{person[0]}/removed-01.jpg"] = CORRUPT_HTML
    extra_ai[f"{prompt[2]}/empty-01.png"] = b""
    return extra_real, extra_ai


def _params(n_persons_per_class: int, image_size: int, seed: int) -> dict[str, int]:
    return {
        "version": FORMAT_VERSION,
        "n_persons_per_class": n_persons_per_class,
        "image_size": image_size,
        "seed": seed,
    }


def _dataset_from_manifest(root: Path, manifest: dict[str, Any]) -> DemoDataset:
    counts = manifest["counts"]
    return DemoDataset(
        root=root,
        site_dir=root / SITE_DIR,
        ai_dir=root / AI_DIR,
        keywords=list(manifest["keywords"]),
        n_real_images=int(counts["real"]),
        n_ai_images=int(counts["ai"]),
        n_exact_duplicates=int(counts["exact_duplicates"]),
        n_near_duplicates=int(counts["near_duplicates"]),
        n_corrupt=int(counts["corrupt"]),
    )


def _reusable_manifest(root: Path, params: dict[str, int]) -> dict[str, Any] | None:
    """The existing manifest if it was made with the same parameters and every file is intact."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("demo manifest %s is unreadable; regenerating", path)
        return None
    if manifest.get("params") != params:
        return None
    for name, digest in manifest.get("files", {}).items():
        file = root / name
        if not file.is_file() or file_sha256(file) != digest:
            log.warning("demo file %s is missing or changed; regenerating", file)
            return None
    return manifest


def _prepare_root(root: Path) -> None:
    """Clear an earlier (or interrupted) generation; refuse to touch a folder that is not demo data."""
    ours = {MANIFEST, SITE_DIR, AI_DIR}
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise ValueError(f"{root} is not a demo data folder (it holds {', '.join(foreign[:5])}); pick another path")
    (root / MANIFEST).unlink(missing_ok=True)
    for name in (SITE_DIR, AI_DIR):
        if (root / name).exists():
            shutil.rmtree(root / name)
    root.mkdir(parents=True, exist_ok=True)


def generate_demo_dataset(
    root: Path, n_persons_per_class: int = 12, image_size: int = 96, seed: int = 0
) -> DemoDataset:
    """Generate (or reuse, if root holds an intact one with the same parameters) a SYNTHETIC demo data set."""
    if n_persons_per_class < 3:
        raise ValueError(f"n_persons_per_class must be at least 3, got {n_persons_per_class}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    root = Path(root).expanduser().resolve()
    params = _params(n_persons_per_class, image_size, seed)
    manifest = _reusable_manifest(root, params)
    if manifest is not None:
        log.info("reusing synthetic demo data in %s", root)
        return _dataset_from_manifest(root, manifest)
    _prepare_root(root)
    real = class_files(seed, n_persons_per_class, image_size, "real")
    ai = class_files(seed, n_persons_per_class, image_size, "ai")
    extra_real, extra_ai = _injections(real, ai, n_persons_per_class)
    files = {f"{SITE_DIR}/{k}": v for k, v in {**real, **extra_real}.items()}
    files |= {f"{AI_DIR}/{k}": v for k, v in {**ai, **extra_ai}.items()}
    for name, data in files.items():
        atomic_write_bytes(root / name, data)
    manifest = {
        "note": "SYNTHETIC demo data: drawn faces, not real people",
        "params": params,
        "keywords": [f"person-{i + 1:02d}" for i in range(n_persons_per_class)],
        "counts": {"real": len(real), "ai": len(ai), "exact_duplicates": 2, "near_duplicates": 2, "corrupt": 3},
        "files": {name: bytes_sha256(data) for name, data in sorted(files.items())},
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    log.info("generated synthetic demo data in %s: %d real, %d ai images", root, len(real), len(ai))
    return _dataset_from_manifest(root, manifest)


def _site_index(site_dir: Path) -> dict[str, list[str]]:
    """keyword -> sorted file names served for it."""
    return {
        folder.name: sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        for folder in sorted(site_dir.iterdir())
        if folder.is_dir()
    }


def result_page(image_urls: list[str]) -> str:
    """A Bing-like async result page (the markup icrawler's BingParser reads)."""
    items = []
    for url in image_urls:
        meta = html.escape(json.dumps({"murl": url, "turl": url}, separators=(",", ":")), quote=True)
        items.append(f'<div class="imgpt"><a class="iusc" m="{meta}" href="#"><img src="{html.escape(url)}"></a></div>')
    body = "\n".join(items) if items else "<p>There are no results.</p>"
    head = "<!doctype html><html><head><meta charset='utf-8'><title>results</title></head>"
    return f"{head}<body>\n{body}\n</body></html>\n"


def _handler_class(site_dir: Path, index: dict[str, list[str]]) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to one site folder."""
    root = site_dir.resolve()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            log.debug("demo site: " + format, *args)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            parts = urlsplit(self.path)
            if parts.path == "/images/async":
                query = parse_qs(parts.query)
                keyword = query.get("q", [""])[0]
                first = query.get("first", ["0"])[0]
                names = index.get(keyword, []) if first == "0" else []
                base = f"http://127.0.0.1:{self.server.server_address[1]}/img/{quote(keyword, safe='')}"
                page = result_page([f"{base}/{quote(name)}" for name in names])
                self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
                return
            if parts.path.startswith("/img/"):
                target = (root / unquote(parts.path[len("/img/") :])).resolve()
                if target.is_relative_to(root) and target.is_file():
                    self._send(200, target.read_bytes(), "image/jpeg")
                    return
            self._send(404, b"not found\n", "text/plain")

    return Handler


@contextlib.contextmanager
def search_site(dataset: DemoDataset, port: int = 0) -> Iterator[str]:
    """Serve the real class as a Bing-like search site on 127.0.0.1; yield its endpoint template.

    A fixed `port` keeps the URLs (and so the crawl log) the same from one demo run to the next, so a second run
    fetches nothing; if that port is taken, a free one is used (the next run then fetches the new URLs, finds every
    file already held, and only the stages before training recompute).
    """
    handler = _handler_class(dataset.site_dir, _site_index(dataset.site_dir))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        log.warning("port %d is not free (%s); serving the demo site on a free port instead", port, error)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    with serving(server) as bound:
        yield f"http://127.0.0.1:{bound}/images/async?q={{keyword}}&first={{offset}}"


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[int]:
    """Run server in a daemon thread; yield its port; shut it down and close it on the way out."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def demo_config_dict(dataset: DemoDataset, endpoint: str, workspace: Path) -> dict[str, Any]:
    """The demo's sources and workspace (merged by the CLI over configs/demo.yaml)."""
    return {
        "sources": {
            "search": [
                {
                    "engine": "bing",
                    "keywords": list(dataset.keywords),
                    "endpoint": endpoint,
                    "label": "real",
                    "max_num": 10,
                    "threads": 2,
                }
            ],
            "folders": [{"path": str(dataset.ai_dir), "label": "ai", "group_by": "folder", "generator": "synthetic"}],
            "allow_private_addresses": True,
            "request_timeout_s": 5,
            "max_retries": 1,
        },
        "report": {
            "data_note": "SYNTHETIC demo data: drawn faces, not real people, made to show that the pipeline works. "
            "These figures say nothing about real photos."
        },
        "execution": {"workspace": str(workspace)},
    }
