"""Write a source's selected cells into tar shards plus a manifest, resumably and atomically.

The plan (which cells go to which shard) is a pure function of the command and the source: the
selected soma_joinids, sorted, cut into runs of ``cells_per_shard``. So a re-run after a kill
recomputes the same plan, skips the shards the manifest lists as complete and writes the rest.
A slice ``I/N`` (one task of a job array) writes only its contiguous share of the plan's shards,
under their global names: the N parts hold exactly the shards one process would write, and
``sharding.merge`` joins them into that same shard set.
A shard is written under a temporary name and renamed when complete; the manifest is replaced
atomically after every shard; so whatever the moment of a SIGKILL, the directory holds only
complete shards and a manifest that lists a subset of them.

Speed: a run of consecutive shards is one pass over the source, in blocks cut on the grid of X's
tiles along cells (TileDB decodes whole tiles, so a block that covered part of a band of tiles
would pay for all of it, and its neighbour again). Reading, encoding and writing overlap: a
thread reads the next block (TileDB releases the GIL) and another writes and hashes the previous
one while this thread encodes. Each stage holds at most one queued block, so memory stays a few
blocks whatever the number of cells.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from scgraph import __version__
from scgraph.data.shards import (
    FORMAT,
    MANIFEST_NAME,
    TAR_END,
    ShardSet,
    content_identity,
    encode_block,
    encode_obs,
    read_manifest,
)
from scgraph.data.vocab import MATCH_KEYS, GeneVocab
from sharding.sources import (
    ObsColumns,
    Source,
    SourceSpec,
    open_source,
    raw_count_defect,
    resolve_obs_options,
)

TMP_SUFFIX = ".partial"
#: Cells per block when the source has no tile grid to follow (the census's X tile extent).
DEFAULT_BLOCK_CELLS = 2048
#: Cells whose obs are read with one query.
OBS_CHUNK_CELLS = 65_536
#: Blocks read ahead of the encoder, and encoded pieces queued for the file writer.
QUEUE_DEPTH = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def parse_slice(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: task I of N (e.g. $SLURM_ARRAY_TASK_ID of an array of N)."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--slice must be I/N with integers 0 <= I < N (e.g. 0/4); got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--slice must be I/N with 0 <= I < N; got {text!r}")
    return i, n


@dataclass(frozen=True)
class WriteOptions:
    """What, besides the source, decides the output: a re-run must repeat these exactly."""

    obs_filter: str | None = None  # None: is_primary_data == True where present; "": every cell
    obs_columns: tuple[str, ...] | None = None  # None: the usual label columns where present
    cells_per_shard: int = 10_000
    max_cells: int | None = None  # a seeded uniform sample of the selected cells
    seed: int = 0
    vocab_from: str | None = None  # a shard set whose gene vocabulary to write in
    match_genes_by: str = "feature_id"
    slice: str | None = None  # "I/N": write only part I of N of the plan's shards

    def __post_init__(self) -> None:
        if self.cells_per_shard < 1:
            raise ValueError(f"--cells-per-shard must be >= 1; got {self.cells_per_shard}")
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError(f"--max-cells must be >= 1; got {self.max_cells}")
        if self.match_genes_by not in MATCH_KEYS:
            raise ValueError(
                f"--match-genes-by must be one of {', '.join(MATCH_KEYS)}; got {self.match_genes_by!r}"
            )
        if self.slice is not None:
            parse_slice(self.slice)


@dataclass
class WriteReport:
    out: str
    cells: int
    shards: int
    bytes: int
    cells_written: int
    shards_written: int
    shards_resumed: int
    genes_dropped: int
    seconds: float
    identity: str

    def summary(self) -> str:
        rate = self.cells_written / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.shards_resumed} already complete" if self.shards_resumed else ""
        dropped = (
            f", {self.genes_dropped} source genes not in the vocabulary dropped" if self.genes_dropped else ""
        )
        return (
            f"{self.out}: {self.cells:,} cells in {self.shards} shards ({self.bytes / 1e6:.1f} MB, "
            f"{self.bytes / max(self.cells, 1):.0f} B/cell, identity {self.identity}); wrote "
            f"{self.shards_written} shards ({self.cells_written:,} cells) in {self.seconds:.1f} s "
            f"({rate:,.0f} cells/s){resumed}{dropped}"
        )


@dataclass
class ShardJob:
    """One shard to write: everything a worker process needs, as plain data."""

    index: int
    joinids: np.ndarray
    out: str
    obs_columns: list[str]
    gene_map: np.ndarray | None  # source var position -> vocabulary index (-1: dropped); None: identity
    vocab_size: int
    block_cells: int | None  # None: the source's tile extent along cells (DEFAULT_BLOCK_CELLS if none)


@dataclass
class Plan:
    """All selected cells cut into shards; ``slice`` (I/N) picks the shards this run writes. The
    digest covers every selected cell, so the parts of one job array can be checked to agree."""

    joinids: np.ndarray
    cells_per_shard: int
    slice: str | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(self.joinids.astype("<i8").tobytes()).hexdigest()[:16]

    @property
    def n_shards(self) -> int:
        return -(-len(self.joinids) // self.cells_per_shard)

    @property
    def shard_indices(self) -> range:
        """This run's shards: contiguous, so each part reads its cells sequentially, and balanced
        by shard, so parts take equal time."""
        if self.slice is None:
            return range(self.n_shards)
        i, n = parse_slice(self.slice)
        return range(self.n_shards * i // n, self.n_shards * (i + 1) // n)

    def record(self) -> dict[str, Any]:
        """What the manifest says of the plan."""
        out: dict[str, Any] = {"cells": len(self.joinids), "shards": self.n_shards, "joinids_sha256": self.digest}
        if self.slice is not None:
            out["slice"] = self.slice
        return out

    def shard(self, index: int) -> np.ndarray:
        return self.joinids[index * self.cells_per_shard : (index + 1) * self.cells_per_shard]


def select_cells(source: Source, obs_filter: str | None, max_cells: int | None, seed: int) -> np.ndarray:
    """Sorted soma_joinids of the selected cells; reading X in this order keeps reads sequential."""
    try:
        joinids = source.select(obs_filter)
    except Exception as err:  # the SOMA/pandas error text is the useful part
        raise ValueError(f"obs filter {obs_filter!r} failed on {source.name}: {err}") from None
    if len(joinids) == 0:
        raise ValueError(f"the query selected no cells (obs filter: {obs_filter!r}); nothing written")
    if max_cells is not None and max_cells < len(joinids):
        keep = np.random.default_rng(seed).choice(len(joinids), size=max_cells, replace=False)
        joinids = joinids[np.sort(keep)]
    return joinids


def gene_mapping(source_genes: GeneVocab, options: WriteOptions) -> tuple[GeneVocab, np.ndarray | None, int]:
    """The output vocabulary, the source->vocabulary column map (None if identity), genes dropped."""
    if options.vocab_from is None:
        return source_genes, None, 0
    target = ShardSet.open(options.vocab_from).vocab
    keys = source_genes.feature_ids if options.match_genes_by == "feature_id" else source_genes.feature_names
    gene_map = target.positions(keys, options.match_genes_by)
    if (gene_map < 0).all():
        raise ValueError(
            f"no gene of the source is in the vocabulary of {options.vocab_from} "
            f"(matching by {options.match_genes_by}, e.g. {keys[0]!r}); nothing written"
        )
    return target, gene_map, int((gene_map < 0).sum())


def _to_vocabulary(counts: sp.csr_matrix, gene_map: np.ndarray | None, vocab_size: int) -> sp.csr_matrix:
    if gene_map is None:
        out = counts
    else:
        keep = np.flatnonzero(gene_map >= 0)
        projection = sp.csr_matrix(
            (np.ones(len(keep), dtype=counts.dtype), (keep, gene_map[keep])),
            shape=(counts.shape[1], vocab_size),
        )
        out = sp.csr_matrix(counts @ projection)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    return out


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
        defect = raw_count_defect(counts)
        if defect is not None:
            defect = (defect[0], f"counts of cell soma_joinid={ids[defect[0]]} contain {defect[1]}")
        counts = _to_vocabulary(counts, job.gene_map, job.vocab_size)
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


class _HashingFile:
    """Write-through file that hashes as it goes, so a shard's sha256 costs no second read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> None:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        os.unlink(self.path)


class ShardFiles:
    """Shards written on a background thread: file writes and sha256 release the GIL, so they run
    beside encoding. A shard is written under a temporary name, fsynced and renamed into place
    there, then ``on_done`` gets its record; shards finish in the order they were begun. After an
    error on either side the partial shard is removed and every earlier shard is still finished."""

    def __init__(self, out: str, on_done: Callable[[dict[str, Any]], None]) -> None:
        self._out, self._on_done = out, on_done
        self._messages: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def begin(self, job: ShardJob) -> None:
        self._put("begin", job)

    def write(self, data: Any, nnz: int) -> None:
        self._put("data", (data, nnz))

    def end(self) -> None:
        self._put("end", None)

    def close(self) -> None:
        """Wait for every shard begun to be finished; raise the writer thread's error, if any."""
        self._put("close", None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Finish the shards already ended, remove the partial one, stop the thread."""
        self._messages.put(("close", None))
        self._thread.join()

    def _put(self, kind: str, payload: Any) -> None:
        if self._error is not None:
            raise self._error
        self._messages.put((kind, payload))

    def _run(self) -> None:
        job, sink, tmp, nnz = None, None, "", 0
        while True:
            kind, payload = self._messages.get()
            if kind == "close":
                if sink is not None:  # begun, never ended: not a complete shard
                    sink.discard()
                return
            if self._error is not None:
                continue  # drain, so the main thread never blocks on a full queue
            try:
                if kind == "begin":
                    job, nnz = payload, 0
                    tmp = os.path.join(self._out, f"{shard_name(job.index)}.{os.getpid()}{TMP_SUFFIX}")
                    sink = _HashingFile(tmp)
                elif kind == "data":
                    sink.write(payload[0])
                    nnz += payload[1]
                else:
                    sink.write(TAR_END)
                    sink.close()
                    final = os.path.join(self._out, shard_name(job.index))
                    os.replace(tmp, final)
                    done, sink = sink, None
                    self._on_done(
                        {
                            "index": job.index,
                            "name": shard_name(job.index),
                            "cells": len(job.joinids),
                            "nnz": int(nnz),
                            "bytes": done.size,
                            "sha256": done.sha256.hexdigest(),
                            "first_joinid": int(job.joinids[0]),
                            "last_joinid": int(job.joinids[-1]),
                        }
                    )
            except BaseException as err:
                self._error = err
                if sink is not None:
                    sink.discard()
                    sink = None


def write_run(
    source: Source,
    jobs: list[ShardJob],
    on_done: Callable[[dict[str, Any]], None],
    on_cells: Callable[[int], None] = lambda n: None,
) -> None:
    """Write consecutive shards ``jobs`` in one pass over the source: a block that straddles two
    shards is read once. Three stages overlap: reading (a thread), encoding (here), writing and
    hashing (a thread). Memory: a few blocks of counts and obs, whatever the number of cells."""
    first = jobs[0]
    block_cells = first.block_cells or source.tile_rows or DEFAULT_BLOCK_CELLS
    joinids = np.concatenate([job.joinids for job in jobs])
    files = ShardFiles(first.out, on_done)
    try:
        with contextlib.closing(prefetch(read_blocks(source, joinids, first, block_cells))) as blocks:
            pending = iter(jobs)
            job, filled = next(pending), 0
            files.begin(job)
            for block in blocks:
                at = 0
                while at < len(block.joinids):
                    take = min(len(block.joinids) - at, len(job.joinids) - filled)
                    if block.defect is not None and at <= block.defect[0] < at + take:
                        raise ValueError(block.defect[1])
                    indptr = block.counts.indptr[at : at + take + 1]
                    files.write(
                        encode_block(
                            block.joinids[at : at + take],
                            indptr,
                            block.counts.indices,
                            block.counts.data,
                            block.obs[at : at + take],
                        ),
                        int(indptr[-1] - indptr[0]),
                    )
                    on_cells(take)
                    at, filled = at + take, filled + take
                    if filled == len(job.joinids):
                        files.end()
                        job, filled = next(pending, None), 0
                        if job is not None:
                            files.begin(job)
        files.close()
    except BaseException:
        files.abort()
        raise


def _manifest_text(payload: dict[str, Any]) -> str:
    """One line per top-level key and per shard: readable, and written by the C JSON encoder
    (``indent`` falls back to the pure-Python one, slow for a 60k-gene vocabulary every shard)."""
    lines = []
    for key, value in payload.items():
        if key == "shards":
            text = "[\n  " + ",\n  ".join(json.dumps(s) for s in value) + "\n ]" if value else "[]"
        else:
            text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(path: str, payload: dict[str, Any]) -> None:
    """Replace the manifest atomically: a reader (or a resumed run) never sees half of one."""
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    with open(tmp, "w") as f:
        f.write(_manifest_text(payload))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old then, new now`` for each key whose value differs."""
    return [
        f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def existing_shards(out: str, command: dict[str, Any], plan: Plan) -> dict[int, dict[str, Any]]:
    """Complete shards a previous run of the same command left in ``out``; refuse anything else.
    Temporary files of a killed run are removed: they never hold a complete shard."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if not os.path.isdir(out):
        return {}
    for tmp in glob.glob(os.path.join(out, f"*{TMP_SUFFIX}")):
        os.unlink(tmp)
    entries = os.listdir(out)
    if not entries:
        return {}
    if MANIFEST_NAME not in entries:
        raise FileExistsError(
            f"--out {out} is not empty and holds no shard set; refusing to write into it "
            f"(choose an empty or new directory)"
        )
    manifest = read_manifest(out)
    diffs = differences(manifest.get("command", {}), command)
    if diffs:
        raise FileExistsError(
            f"--out {out} holds shards from a different command ({'; '.join(diffs)}); "
            f"refusing to overwrite (choose an empty or new directory)"
        )
    if manifest.get("plan", {}).get("joinids_sha256") != plan.digest:
        raise FileExistsError(
            f"--out {out}: the source now selects different cells than when these shards "
            f"were written; refusing to mix them (choose an empty or new directory)"
        )
    return {s["index"]: s for s in manifest["shards"]}


def build_manifest(
    command: dict[str, Any],
    vocabulary: dict[str, list[str]],
    plan: dict[str, Any],
    expected: range,
    shards: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """The manifest of a shard set whose ``plan`` (``Plan.record()``) expects shards ``expected``
    and that holds ``shards`` (index -> record): totals, and the identity once complete. Written
    by the writer after every shard and by ``merge`` for the joined parts."""
    listed = [shards[i] for i in sorted(shards)]
    complete = sorted(shards) == list(expected)
    return {
        "format": FORMAT,
        "tool": {"name": "scgraph.sharding", "version": __version__},
        "source": command["source"],
        "obs_filter": command["obs_filter"],
        "obs_columns": command["obs_columns"],
        "command": command,
        "plan": plan,
        "complete": complete,
        "identity": content_identity(vocabulary, listed) if complete else None,
        "totals": {
            "cells": sum(s["cells"] for s in listed),
            "shards": len(listed),
            "bytes": sum(s["bytes"] for s in listed),
            "nnz": sum(s["nnz"] for s in listed),
        },
        "shards": listed,
        "vocabulary": vocabulary,
    }


_WORKER_STACK = contextlib.ExitStack()  # holds a worker's open source until the process exits
_WORKER_SOURCE: Any = None
_WORKER_RECORDS: Any = None


def _init_worker(spec: SourceSpec, records: Any) -> None:
    """Each worker process opens the source once and keeps it for all its shards; it sends each
    finished shard's record back at once, so the manifest follows every shard, as with one process."""
    global _WORKER_SOURCE, _WORKER_RECORDS
    _WORKER_SOURCE = _WORKER_STACK.enter_context(open_source(spec))
    _WORKER_RECORDS = records


def _write_in_worker(jobs: list[ShardJob]) -> None:
    for run in consecutive(jobs):
        write_run(_WORKER_SOURCE, run, _WORKER_RECORDS.put)


def _write_in_pool(
    spec: SourceSpec, jobs: list[ShardJob], workers: int, finished: Callable[[dict[str, Any]], None]
) -> None:
    """``jobs`` cut into 2 x ``workers`` contiguous parts (each read in one pass; more parts than
    workers so a slow one is not waited for), written by ``workers`` processes."""
    context = multiprocessing.get_context("spawn")
    records = context.Queue()
    parts = [list(part) for part in np.array_split(np.array(jobs, dtype=object), min(len(jobs), 2 * workers))]
    pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec, records))
    try:
        futures = [pool.submit(_write_in_worker, part) for part in parts]
        expected = len(jobs)
        while expected:
            try:
                record = records.get(timeout=0.2)
            except queue.Empty:
                for future in futures:
                    if future.done():
                        future.result()  # a worker's error, raised here
                continue
            finished(record)
            expected -= 1
    finally:  # on an error, stop at once rather than after every queued part
        pool.shutdown(wait=True, cancel_futures=True)
        while True:  # shards finished meanwhile are complete: list them
            try:
                finished(records.get_nowait())
            except queue.Empty:
                break


def consecutive(jobs: list[ShardJob]) -> list[list[ShardJob]]:
    """``jobs`` cut where a shard index is skipped (a resumed run): each part is one pass."""
    runs: list[list[ShardJob]] = []
    for job in jobs:
        if runs and runs[-1][-1].index + 1 == job.index:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def write_shards(
    spec: SourceSpec,
    out: str,
    options: WriteOptions = WriteOptions(),
    *,
    workers: int = 1,
    block_cells: int | None = None,
    progress: bool = True,
) -> WriteReport:
    """The ``write`` command. Checks everything it can (columns, filter, vocabulary, the output
    directory) before creating anything, so bad input leaves no trace."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1; got {workers}")
    started = time.perf_counter()
    out = os.path.abspath(out)
    with open_source(spec) as source:
        obs_filter, obs_columns = resolve_obs_options(
            source.obs_columns, options.obs_filter, options.obs_columns
        )
        genes = source.genes()
        vocab, gene_map, dropped = gene_mapping(GeneVocab(genes.feature_ids, genes.feature_names), options)
        plan = Plan(
            select_cells(source, obs_filter, options.max_cells, options.seed),
            options.cells_per_shard,
            options.slice,
        )
        command = {
            "source": spec.describe(),
            "obs_filter": obs_filter,
            "obs_columns": obs_columns,
            **{k: v for k, v in asdict(options).items() if k not in ("obs_filter", "obs_columns")},
        }
        if options.vocab_from is not None:
            command["vocab_from"] = ShardSet.open(options.vocab_from).identity
        done = existing_shards(out, command, plan)
        created = not os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        jobs = [
            ShardJob(i, plan.shard(i), out, obs_columns, gene_map, len(vocab), block_cells)
            for i in plan.shard_indices
            if i not in done
        ]
        resumed = len(done)
        vocabulary = {"feature_id": vocab.feature_ids, "feature_name": vocab.feature_names}
        manifest_path = os.path.join(out, MANIFEST_NAME)

        def save_manifest() -> None:
            write_manifest(
                manifest_path, build_manifest(command, vocabulary, plan.record(), plan.shard_indices, done)
            )

        if not plan.shard_indices:  # a slice with no shard (more tasks than shards) still says it is done
            save_manifest()
        bar = tqdm(
            total=sum(len(plan.shard(i)) for i in plan.shard_indices),
            initial=sum(s["cells"] for s in done.values()),
            unit="cell",
            unit_scale=True,
            desc="write",
            disable=not progress,
            dynamic_ncols=True,
        )

        def finished(record: dict[str, Any]) -> None:
            done[record["index"]] = record
            save_manifest()

        try:
            if workers == 1 or len(jobs) <= 1:
                for run in consecutive(jobs):
                    write_run(source, run, finished, bar.update)
            else:

                def finished_in_pool(record: dict[str, Any]) -> None:
                    finished(record)
                    bar.update(record["cells"])

                _write_in_pool(spec, jobs, workers, finished_in_pool)
        finally:
            bar.close()
            if created and not done:
                _remove_if_empty(out)
    manifest = read_manifest(out)
    return WriteReport(
        out=out,
        cells=manifest["totals"]["cells"],
        shards=manifest["totals"]["shards"],
        bytes=manifest["totals"]["bytes"],
        cells_written=sum(j.joinids.size for j in jobs),
        shards_written=len(jobs),
        shards_resumed=resumed,
        genes_dropped=dropped,
        seconds=time.perf_counter() - started,
        identity=manifest["identity"],
    )


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
