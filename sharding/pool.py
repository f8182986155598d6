"""``--workers N``: shard runs written by N processes, each opening the source once, their
finished shards' records streamed back so the manifest follows every shard as with one process."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable
from typing import Any

import numpy as np

from scgraph.io.sources import SourceSpec, open_source
from sharding.plan import ShardJob
from sharding.sink import write_run

_PR_SET_PDEATHSIG = 1  # prctl(2)
_WORKER_STACK = contextlib.ExitStack()  # holds a worker's open source until the process exits
_WORKER_SOURCE: Any = None
_WORKER_RECORDS: Any = None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies: a killed ``write`` must not leave
    workers writing on (their partial shards are temporary files the next run removes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still applies
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(spec: SourceSpec, records: Any) -> None:
    """Each worker process opens the source once and keeps it for all its shards; it sends each
    finished shard's record back at once, so the manifest follows every shard, as with one process."""
    _die_with_parent()
    global _WORKER_SOURCE, _WORKER_RECORDS
    _WORKER_SOURCE = _WORKER_STACK.enter_context(open_source(spec))
    _WORKER_RECORDS = records


def _write_in_worker(jobs: list[ShardJob]) -> None:
    for run in consecutive(jobs):
        write_run(_WORKER_SOURCE, run, _WORKER_RECORDS.put)


def write_in_pool(
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


