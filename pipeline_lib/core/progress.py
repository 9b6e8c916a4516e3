"""Progress of the long loops (crawl, ingest, hashing, preprocessing, scoring, Grad-CAM) for a person watching.

On a terminal a bar is drawn on stderr (tqdm; several at once when chunks run in parallel). Otherwise (a log file,
CI) plain lines go to this module's logger: one every LINE_EVERY_S while the loop runs, and one at the end when it
took at least QUIET_BELOW_S. The CLI keeps them in the command's log file (and Prefect's run logs); --verbose shows
them on the console.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
LINE_EVERY_S = 10.0  # plain mode: a line at most this often while a loop runs
QUIET_BELOW_S = 2.0  # plain mode: loops shorter than this end without a line


def on_terminal() -> bool:
    """Whether stderr is a terminal a bar can be drawn on."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(items: Iterable[T], total: int, what: str, unit: str = "image", step: int = 1) -> Iterator[T]:
    """Yield items unchanged while showing how far the loop is; step: how many units one item stands for."""
    if on_terminal():
        yield from _bar(items, total, what, unit, step)
    else:
        yield from _lines(items, total, what, unit, step)


def _bar(items: Iterable[T], total: int, what: str, unit: str, step: int) -> Iterator[T]:
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
        for item in items:
            yield item
            bar.update(min(step, total - bar.n) if total else step)


def _lines(items: Iterable[T], total: int, what: str, unit: str, step: int) -> Iterator[T]:
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done = min(done + step, total) if total else done + step
        now = time.monotonic()
        if now - last >= LINE_EVERY_S:
            last = now
            log.info("%s: %s", what, describe(done, total, unit, now - started))
    elapsed = time.monotonic() - started
    if elapsed >= QUIET_BELOW_S:
        log.info("%s: %s", what, describe(done, total, unit, elapsed))


def describe(done: int, total: int, unit: str, elapsed: float) -> str:
    """'120/480 images (25%), 12 img/s, about 30 s left' (or '480 images in 40 s' when done)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    units = unit if done == 1 else f"{unit}s"
    if total and done >= total:
        return f"{done} {units} in {elapsed:.1f} s ({rate:.1f}/s)"
    if not total:
        return f"{done} {units} so far, {rate:.1f}/s"
    left = (total - done) / rate if rate > 0 else float("inf")
    eta = f"about {left:.0f} s left" if left != float("inf") else "time left unknown"
    return f"{done}/{total} {units} ({done / total:.0%}), {rate:.1f}/s, {eta}"
