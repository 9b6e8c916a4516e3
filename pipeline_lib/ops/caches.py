"""The per-image caches a run reads, and a fresh start of them for --refresh-cache.

Each per-image cache keeps entries per image across runs (validation records, perceptual hashes, tensors, face
hints, review thumbnails, the features of the review queue and of probes) and is named by the digest of the code
that makes its entries (code_index.producer_code): a change of that code starts a new cache on the next plain run.
--refresh-cache removes the current ones of the run's config before its stages run, so that every entry it needs is
made again by the code now.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from pipeline_lib.acquire import fingerprint, ingest
from pipeline_lib.core.config import PipelineConfig
from pipeline_lib.core.workspace import Workspace
from pipeline_lib.curate import review, review_pack
from pipeline_lib.learn import preprocess

log = logging.getLogger(__name__)


def data_caches(workspace: Workspace, config: PipelineConfig) -> list[Path]:
    """The caches of the data stages under config: validation records, hashes, face hints, review thumbnails, and
    every model's per-image features (the review queue, before the gate, is the first stage to read them; a probe
    reads them again after it)."""
    from pipeline_lib.learn import features  # torch: only a --refresh-cache run needs it here

    return [
        ingest.records_folder(workspace, config.ingest),
        fingerprint.cache_path(workspace, config.dedup.algorithm, config.dedup.hash_size),
        review_pack.faces_path(workspace),
        review.thumbnail_folder(workspace),
        features.features_root(workspace),
    ]


def model_caches(workspace: Workspace, config: PipelineConfig) -> list[Path]:
    """The caches of the model stages under config: the tensors of train.image_size and preprocess.normalize."""
    return [preprocess.tensor_folder(workspace, config.train.image_size, config.preprocess.normalize)]


def drop_caches(workspace: Workspace, paths: Iterable[Path]) -> list[Path]:
    """Remove the given cache files and folders (each must lie in the workspace); the ones that existed."""
    removed = []
    for path in paths:
        if not path.resolve().is_relative_to(workspace.root.resolve()):
            raise ValueError(f"{path} is not inside the workspace {workspace.root}: not a cache to drop")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    if removed:
        log.info("refresh: per-image caches removed: %s", ", ".join(workspace.relative(p) for p in removed))
    return removed
