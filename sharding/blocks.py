"""Reading a run of shards' cells from the source, block by block, a block ahead of the encoder.

Blocks follow the grid of X's tiles along cells (TileDB decodes whole tiles, so a block that
covered part of a band of tiles would pay for all of it, and its neighbour again). obs are read for
many blocks at once (an obs query costs about 10 ms whatever its size) and encoded as JSON once per
distinct combination of values. A thread reads the next block while this one is encoded: TileDB
releases the GIL.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scgraph.data.shards import encode_obs
from scgraph.io.counts import count_defect
from scgraph.io.sources import ObsColumns, Source
from sharding.plan import ShardJob

#: Cells per block when the source has no tile grid to follow (the census's X tile extent).
DEFAULT_BLOCK_CELLS = 2048
#: Cells whose obs are read with one query.
OBS_CHUNK_CELLS = 65_536
#: Blocks read ahead of the encoder, and encoded pieces queued for the file writer.
QUEUE_DEPTH = 1


def _canonical(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted gene indices, no duplicates, no explicit zeros: what a shard stores."""
    counts.sum_duplicates()
    counts.eliminate_zeros()
    counts.sort_indices()
    return counts


def _jsonable(value: Any) -> Any:
    """obs values as JSON types; missing values (NaN, None) become null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@functools.lru_cache(maxsize=65536)
def _obs_bytes(names: tuple[str, ...], values: tuple[Any, ...]) -> bytes:
    return encode_obs({k: _jsonable(v) for k, v in zip(names, values, strict=True)})


def obs_json(columns: ObsColumns, n_cells: int) -> list[bytes]:
    """Each cell's obs as JSON. Census obs columns are categorical, so cells repeat a few value
    combinations: cached per combination, so encoding is a lookup for almost every cell."""
    names = tuple(columns)
    if not names:
        return [encode_obs({})] * n_cells
    return [_obs_bytes(names, values) for values in zip(*columns.values(), strict=True)]


def merge_runs(bounds: list[int], limit: int) -> list[slice]:
    """Consecutive runs ``bounds[i]:bounds[i + 1]`` joined while a join holds at most ``limit``
    items (a run longer than ``limit`` stays alone)."""
    out, start, previous = [], bounds[0], bounds[0]
    for end in bounds[1:]:
        if end - start > limit and previous > start:
            out.append(slice(start, previous))
            start = previous
        previous = end
    out.append(slice(start, bounds[-1]))
    return out


def cut_blocks(joinids: np.ndarray, block_cells: int) -> list[slice]:
    """The positions of sorted ``joinids`` read with one query each. Blocks follow the grid of
    ``block_cells`` consecutive soma_joinids, so with X's tile extent no two blocks decode the same
    tiles (reading part of a band of tiles costs as much as all of it: cutting a shard's 10,000
    cells into 1,024-cell blocks read X three times slower); a sparse selection joins consecutive
    bands while a block holds at most ``block_cells`` cells, so few cells do not mean many queries."""
    if not len(joinids):
        return []
    band_starts = np.flatnonzero(np.diff(joinids // block_cells)) + 1
    return merge_runs([0, *band_starts.tolist(), len(joinids)], block_cells)


@dataclass
class Block:
    """Consecutive selected cells read together: counts in the output vocabulary, obs as JSON."""

    joinids: np.ndarray
    counts: sp.csr_matrix
    obs: list[bytes]
    defect: tuple[int, str] | None = None  # (row, message) of the first cell without raw counts


def read_blocks(
    source: Source, joinids: np.ndarray, job: ShardJob, block_cells: int
) -> Iterator[Block]:
    """``joinids`` block by block. obs are read for up to ``OBS_CHUNK_CELLS`` cells at once (an obs
    query costs about 10 ms whatever its size); a defect in the counts is attached to its block,
    not raised, so the shards before the bad cell are still completed."""
    blocks = cut_blocks(joinids, block_cells)
    chunks = iter(merge_runs([0, *[b.stop for b in blocks]], OBS_CHUNK_CELLS))  # whole blocks each
    chunk, obs = slice(0, 0), []
    for part in blocks:
        if part.start >= chunk.stop:
            chunk = next(chunks)
            obs = obs_json(source.read_obs(joinids[chunk], job.obs_columns), chunk.stop - chunk.start)
        ids = joinids[part]
        counts = source.read_counts(ids)
        defect = count_defect(counts)
        if defect is not None:
            defect = (defect[0], f"{source.counts_name}: counts of cell soma_joinid={ids[defect[0]]} contain "
                                 f"{defect[1]}")
        counts = job.gene_map.apply(counts) if job.gene_map is not None else _canonical(counts)
        yield Block(ids, counts, obs[part.start - chunk.start : part.stop - chunk.start], defect)


def prefetch(items: Iterator[Any], depth: int = QUEUE_DEPTH) -> Iterator[Any]:
    """``items`` produced on a background thread, up to ``depth`` ahead. TileDB reads release the
    GIL, so the next block is read while this one is encoded and written. Closing the generator
    (or an error on either side) stops the thread."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            put(("error", err))

    thread = threading.Thread(target=produce, name="shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


