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
import time
from collections.abc import Callable
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
    check_raw_counts,
    open_source,
    resolve_obs_options,
)

TMP_SUFFIX = ".partial"


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
    block_cells: int


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


class _HashingFile:
    """Write-through file that hashes as it goes, so a shard's sha256 costs no second read."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def write_shard(
    source: Source, job: ShardJob, on_cells: Callable[[int], None] = lambda n: None
) -> dict[str, Any]:
    """Stream ``job``'s cells block by block into a temporary tar, then rename it into place.
    Memory: one block of counts and obs. On any error the temporary file is removed."""
    name = shard_name(job.index)
    final = os.path.join(job.out, name)
    tmp = f"{final}.{os.getpid()}{TMP_SUFFIX}"
    sink = _HashingFile(tmp)
    nnz = 0
    try:
        for start in range(0, len(job.joinids), job.block_cells):
            block = job.joinids[start : start + job.block_cells]
            counts, obs = source.read_block(block, job.obs_columns)
            check_raw_counts(counts, [f"soma_joinid={j}" for j in block])
            counts = _to_vocabulary(counts, job.gene_map, job.vocab_size)
            nnz += counts.nnz
            sink.write(
                encode_block(
                    block.tolist(), counts.indptr, counts.indices, counts.data, obs_json(obs, len(block))
                )
            )
            on_cells(len(block))
        sink.write(TAR_END)
        sink.close()
        os.replace(tmp, final)
    except BaseException:
        sink.close()
        os.unlink(tmp)
        raise
    return {
        "index": job.index,
        "name": name,
        "cells": len(job.joinids),
        "nnz": int(nnz),
        "bytes": sink.size,
        "sha256": sink.sha256.hexdigest(),
        "first_joinid": int(job.joinids[0]),
        "last_joinid": int(job.joinids[-1]),
    }


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


def _init_worker(spec: SourceSpec) -> None:
    """Each worker process opens the source once and keeps it for all its shards."""
    global _WORKER_SOURCE
    _WORKER_SOURCE = _WORKER_STACK.enter_context(open_source(spec))


def _write_in_worker(job: ShardJob) -> dict[str, Any]:
    return write_shard(_WORKER_SOURCE, job)


def write_shards(
    spec: SourceSpec,
    out: str,
    options: WriteOptions = WriteOptions(),
    *,
    workers: int = 1,
    block_cells: int = 1024,
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
                for job in jobs:
                    finished(write_shard(source, job, bar.update))
            else:
                pool = cf.ProcessPoolExecutor(
                    workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(spec,),
                )
                try:
                    for future in cf.as_completed([pool.submit(_write_in_worker, job) for job in jobs]):
                        record = future.result()
                        finished(record)
                        bar.update(record["cells"])
                finally:  # on an error, stop at once rather than after every queued shard
                    pool.shutdown(wait=True, cancel_futures=True)
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
