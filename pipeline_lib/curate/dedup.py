"""Exact and near-duplicate detection over perceptual hashes: multi-index hashing or BK-tree, union-find clusters."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from math import comb
from typing import Any

import numpy as np
import pandas as pd

from pipeline_lib.core.catalog import DUPLICATE_PREFIX, STATUS_OK, conform

log = logging.getLogger(__name__)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two int hashes."""
    return (a ^ b).bit_count()


class BKTree:
    """A Burkhard-Keller tree over int hashes with Hamming distance; query() is exact for any radius.

    Items are identified by their insertion index (0, 1, ...); equal hashes are all kept.
    """

    def __init__(self, hashes: Iterable[int] = ()) -> None:
        self._values: list[int] = []
        self._children: list[dict[int, int]] = []
        for value in hashes:
            self.add(value)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int) -> int:
        """Insert a hash and return its index."""
        index = len(self._values)
        self._values.append(value)
        self._children.append({})
        if index == 0:
            return index
        node = 0
        while True:
            distance = hamming(value, self._values[node])
            child = self._children[node].get(distance)
            if child is None:
                self._children[node][distance] = index
                return index
            node = child

    def query(self, value: int, radius: int) -> list[int]:
        """Sorted indices of all inserted hashes within Hamming distance <= radius of value."""
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        if not self._values:
            return []
        found: list[int] = []
        stack = [0]
        while stack:
            node = stack.pop()
            distance = hamming(value, self._values[node])
            if distance <= radius:
                found.append(node)
            low, high = distance - radius, distance + radius
            stack.extend(child for edge, child in self._children[node].items() if low <= edge <= high)
        return sorted(found)


def _masks(width: int, radius: int) -> list[int]:
    """All width-bit XOR masks with at most radius bits set."""
    return [sum(1 << bit for bit in bits) for k in range(radius + 1) for bits in combinations(range(width), k)]


def _plan(n: int, bits: int, threshold: int) -> int:
    """Number of chunks for multi-index hashing that minimises estimated probes plus candidate checks."""
    best, best_cost = 1, float("inf")
    for chunks in range(1, min(bits, threshold + 1) + 1):
        width = -(-bits // chunks)
        probes = sum(comb(width, k) for k in range(threshold // chunks + 1))
        cost = n * chunks * probes * (1 + n / 2**width)
        if cost < best_cost:
            best, best_cost = chunks, cost
    return best


class MultiIndexHash:
    """Multi-index hashing: exact radius search, sub-quadratic when hashes are spread out.

    The bits are cut into `chunks` parts; two hashes within `radius` bits agree to within radius // chunks bits
    on at least one part (pigeonhole), so each part's table is probed only with those few neighbours.
    """

    def __init__(self, bits: int, radius: int, chunks: int) -> None:
        if bits < 1 or radius < 0 or not 1 <= chunks <= bits:
            raise ValueError(f"need bits >= 1, radius >= 0 and 1 <= chunks <= bits; got {bits}, {radius}, {chunks}")
        self.radius = radius
        edges = [round(i * bits / chunks) for i in range(chunks + 1)]
        self._parts = [(low, (1 << (high - low)) - 1) for low, high in zip(edges, edges[1:], strict=False)]
        self._masks = {mask: _masks(mask.bit_length(), radius // chunks) for _, mask in self._parts}
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._parts]
        self._values: list[int] = []

    def add(self, value: int) -> int:
        """Insert a hash and return its index."""
        index = len(self._values)
        self._values.append(value)
        for table, (shift, mask) in zip(self._tables, self._parts, strict=True):
            table.setdefault((value >> shift) & mask, []).append(index)
        return index

    def query(self, value: int) -> list[int]:
        """Sorted indices of inserted hashes within Hamming distance <= radius of value."""
        seen: set[int] = set()
        for table, (shift, mask) in zip(self._tables, self._parts, strict=True):
            part = (value >> shift) & mask
            for flip in self._masks[mask]:
                seen.update(table.get(part ^ flip, ()))
        return sorted(i for i in seen if hamming(value, self._values[i]) <= self.radius)


# Vectorised multi-index search (hashes of <= 64 bits): a chunk's buckets are looked up in a dense offsets table
# when the chunk has at most _TABLE_BITS bits, else by binary search; work is done in batches of _BATCH probes.
_TABLE_BITS = 24
_BATCH = 1 << 22
_POPCOUNT8 = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return _POPCOUNT8[values.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.uint8)


def _plan_vectorised(n: int, bits: int, threshold: int) -> int:
    """Number of chunks minimising estimated lookups (half the flips, see _chunk_pairs) plus candidate checks."""
    best, best_cost = 1, float("inf")
    for chunks in range(1, min(bits, threshold + 1) + 1):
        width = -(-bits // chunks)
        probes = sum(comb(width, k) for k in range(threshold // chunks + 1))
        lookup_cost = 2.0 if width <= _TABLE_BITS else 30.0
        cost = chunks * (lookup_cost * (1 + probes / 2) + probes * n / 2**width / 2)
        if cost < best_cost:
            best, best_cost = chunks, cost
    return best


class _Buckets:
    """Items sorted by one chunk's key, with each key's [start, end) range in that order."""

    def __init__(self, keys: np.ndarray, width: int) -> None:
        self.order = np.argsort(keys, kind="stable")
        self.rank = np.empty(len(keys), dtype=np.int64)
        self.rank[self.order] = np.arange(len(keys))
        self._sorted = keys[self.order]
        self._starts: np.ndarray | None = None
        if width <= _TABLE_BITS:
            self._starts = np.zeros((1 << width) + 1, dtype=np.int64)
            np.cumsum(np.bincount(keys, minlength=1 << width), out=self._starts[1:])

    def ranges(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start and end positions (in self.order) of the items whose key equals each query."""
        if self._starts is not None:
            return self._starts[queries], self._starts[queries + 1]
        return np.searchsorted(self._sorted, queries, "left"), np.searchsorted(self._sorted, queries, "right")


def _verified(
    owners: np.ndarray, low: np.ndarray, high: np.ndarray, buckets: _Buckets, values: np.ndarray, threshold: int
) -> list[np.ndarray]:
    """Codes i * n + j (i < j) of owner/candidate pairs within threshold, candidates = order[low:high] per owner."""
    lengths = high - low
    keep = lengths > 0
    owners, low, lengths = owners[keep], low[keep], lengths[keep]
    n = len(values)
    found: list[np.ndarray] = []
    start = 0
    ends = np.cumsum(lengths)
    while start < len(owners):
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _BATCH, "right")))
        sizes = lengths[start:stop]
        total = int(sizes.sum())
        offsets = np.cumsum(sizes) - sizes
        positions = np.repeat(low[start:stop] - offsets, sizes) + np.arange(total)
        first = np.repeat(owners[start:stop], sizes)
        second = buckets.order[positions]
        close = _popcount(values[first] ^ values[second]) <= threshold
        first, second = first[close], second[close]
        found.append(np.minimum(first, second) * n + np.maximum(first, second))
        start = stop
    return found


def _chunk_pairs(values: np.ndarray, shift: int, width: int, flips: np.ndarray, threshold: int) -> list[np.ndarray]:
    """Pair codes within threshold among items whose chunk keys differ by one of flips (flips[0] == 0).

    Each unordered pair is probed once: equal keys from the item's own rank onwards, different keys only from
    the item with the smaller key (a flip f links k and k ^ f both ways).
    """
    keys = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
    buckets = _Buckets(keys, width)
    everyone = np.arange(len(keys), dtype=np.int64)
    found = _verified(everyone, buckets.rank + 1, buckets.ranges(keys)[1], buckets, values, threshold)
    others = flips[1:]
    if not len(others):
        return found
    per_batch = max(1, _BATCH // len(others))
    for begin in range(0, len(keys), per_batch):
        own = keys[begin : begin + per_batch, None]
        queries = own ^ others[None, :]
        upward = queries > own
        owners = np.broadcast_to(everyone[begin : begin + per_batch, None], queries.shape)[upward]
        low, high = buckets.ranges(queries[upward])
        found.extend(_verified(owners, low, high, buckets, values, threshold))
    return found


def _near_pairs_vectorised(values: np.ndarray, bits: int, threshold: int) -> np.ndarray:
    """Sorted unique codes i * n + j (i < j) of all pairs within threshold (multi-index hashing, numpy)."""
    chunks = _plan_vectorised(len(values), bits, threshold)
    edges = [round(i * bits / chunks) for i in range(chunks + 1)]
    found: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    for low, high in zip(edges, edges[1:], strict=False):
        flips = np.array(_masks(high - low, threshold // chunks), dtype=np.int64)
        found.extend(_chunk_pairs(values, low, high - low, flips, threshold))
    return np.unique(np.concatenate(found))


def find_near_pairs(hashes: list[int], threshold: int) -> list[tuple[int, int]]:
    """Sorted pairs (i, j), i < j, of positions whose hashes differ in <= threshold bits (multi-index hashing).

    Hashes of up to 64 bits are searched with numpy in batches; longer ones with MultiIndexHash.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if any(value < 0 for value in hashes):
        raise ValueError("hashes must be non-negative ints")
    bits = max((value.bit_length() for value in hashes), default=0) or 1
    if len(hashes) < 2:
        return []
    if bits <= 64:
        codes = _near_pairs_vectorised(np.array(hashes, dtype=np.uint64), bits, threshold)
        n = len(hashes)
        return list(zip((codes // n).tolist(), (codes % n).tolist(), strict=True))
    index = MultiIndexHash(bits, threshold, _plan(len(hashes), bits, threshold))
    pairs: list[tuple[int, int]] = []
    for j, value in enumerate(hashes):
        pairs.extend((i, j) for i in index.query(value))
        index.add(value)
    return sorted(pairs)


def brute_force_pairs(hashes: list[int], threshold: int) -> list[tuple[int, int]]:
    """The same as find_near_pairs by comparing every pair (for tests and benchmarks)."""
    return [
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if hamming(hashes[i], hashes[j]) <= threshold
    ]


def parse_hashes(hex_hashes: Iterable[str]) -> list[int]:
    """Hex hashes as ints; ValueError if one is empty, not hex, or of a different length than the others."""
    values = [str(h) for h in hex_hashes]
    lengths = sorted({len(h) for h in values})
    if 0 in lengths:
        raise ValueError("some usable rows have no phash: run the fingerprint stage before dedup")
    if len(lengths) > 1:
        raise ValueError(
            f"hashes have different lengths {lengths} (hex digits): the catalog mixes hash sizes; "
            "re-run fingerprint with one dedup.hash_size"
        )
    try:
        return [int(h, 16) for h in values]
    except ValueError as error:
        raise ValueError(f"phash values must be hexadecimal: {error}") from error


class UnionFind:
    """Disjoint sets of hashable, ordered items (image positions here, groups in split); the smallest item is root."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, item: Any) -> Any:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]  # path halving
            item = self.parent[item]
        return item

    def union(self, a: Any, b: Any) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


@dataclass(frozen=True)
class DedupResult:
    """The deduplicated catalog and what dedup found.

    n_exact: usable rows whose sha256 already appeared in an earlier usable row.
    n_near: rows now marked duplicate_of a *different* sha256 (the keeper of their near-duplicate cluster;
    exact copies of a non-keeper also point at that keeper, so they count in both).
    n_clusters: near-duplicate clusters with >= 2 distinct sha256.
    cross_group_clusters: for each cluster spanning several groups, its sorted group names.
    """

    catalog: pd.DataFrame
    n_exact: int
    n_near: int
    n_clusters: int
    cross_group_clusters: list[list[str]]


def _time_order(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by fetched_at (unknown last), then original order."""
    return rows.assign(_order=range(len(rows))).sort_values(["fetched_at", "_order"], na_position="last", kind="stable")


def _firsts(ok: pd.DataFrame) -> pd.DataFrame:
    """The first row (by fetched_at, then row order) of each sha256, in that order."""
    return _time_order(ok).drop_duplicates("sha256").drop(columns="_order")


def _clusters(firsts: pd.DataFrame, threshold: int) -> list[list[int]]:
    """Positions (in firsts) of each near-duplicate cluster with >= 2 members."""
    pairs = find_near_pairs(parse_hashes(firsts["phash"]), threshold)
    forest = UnionFind()
    for i, j in pairs:
        forest.union(i, j)
    members: dict[int, list[int]] = {}
    for position in range(len(firsts)):
        members.setdefault(forest.find(position), []).append(position)
    return [group for group in members.values() if len(group) > 1]


def _keeper(candidates: pd.DataFrame) -> str:
    """The sha256 to keep: most pixels, then earliest fetched_at, then smallest sha256."""
    pixels = (candidates["width"].astype("Float64") * candidates["height"].astype("Float64")).fillna(0)
    ranked = candidates.assign(_pixels=-pixels.astype(float)).sort_values(
        ["_pixels", "fetched_at", "sha256"], na_position="last", kind="stable"
    )
    return str(ranked["sha256"].iloc[0])


def find_duplicates(catalog: pd.DataFrame, threshold: int) -> DedupResult:
    """Mark exact and near duplicates among ok rows; other rows are returned unchanged.

    Exact: rows sharing a sha256 keep "ok" on their first row only. Near: distinct sha256 whose `phash`
    differ in <= threshold bits are joined (union-find); the keeper's rows stay ok, the other sha256's rows
    become duplicate_of:<keeper>, and every row of the cluster gets cluster=<keeper>; lone images get cluster="".
    Raises ValueError when usable rows lack hashes or mix hash lengths.
    """
    table = conform(catalog)
    ok_mask = table["status"] == STATUS_OK
    ok = table[ok_mask]
    ordered = _time_order(ok)
    later_copies = ordered.index[ordered["sha256"].duplicated()]
    status = table["status"].copy()
    status.loc[later_copies] = DUPLICATE_PREFIX + table.loc[later_copies, "sha256"]
    cluster = table["cluster"].copy()
    cluster.loc[ok_mask] = ""
    firsts = _firsts(ok)
    cross_group: list[list[str]] = []
    clusters = _clusters(firsts, threshold) if len(firsts) > 1 else []
    for positions in clusters:
        shas = firsts["sha256"].iloc[positions]
        keeper = _keeper(firsts.iloc[positions])
        rows = ok.index[ok["sha256"].isin(set(shas))]
        cluster.loc[rows] = keeper
        others = rows[table.loc[rows, "sha256"] != keeper]
        status.loc[others] = DUPLICATE_PREFIX + keeper
        groups = sorted(set(table.loc[rows, "group"].astype(str)))
        if len(groups) > 1:
            cross_group.append(groups)
    out = table.assign(status=status, cluster=cluster)
    marked = status[ok_mask]
    n_near = int(((marked != STATUS_OK) & (marked != DUPLICATE_PREFIX + ok["sha256"])).sum())
    log.info("dedup: %d exact copies, %d near duplicates, %d clusters", len(later_copies), n_near, len(clusters))
    return DedupResult(conform(out), len(later_copies), n_near, len(clusters), sorted(cross_group))
