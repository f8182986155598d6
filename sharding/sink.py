"""Writing shards: encoded cells streamed to a temporary file on a thread (write and sha256
release the GIL), fsynced and renamed into place, so a shard on disk under its name is complete.
``write_run`` drives one run of consecutive shards: reading (a thread), encoding (here) and writing
(a thread) overlap, each stage with at most one queued block, so memory is a few blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from scgraph.data.shards import TAR_END, encode_block, shard_name
from scgraph.io.files import TMP_SUFFIX, named
from scgraph.io.sources import Source
from sharding.blocks import DEFAULT_BLOCK_CELLS, QUEUE_DEPTH, prefetch, read_blocks
from sharding.plan import ShardJob


class _HashingFile:
    """Write-through file that hashes as it goes, so a shard's sha256 costs no second read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> None:
        try:
            self._file.write(data)
        except OSError as err:  # a full disk: name the shard
            raise named(err, self.path) from None
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as err:
            raise named(err, self.path) from None

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:  # the buffered rest of a shard that is being thrown away
            pass
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


