"""The streaming loader: shards -> ``SparseBatch``es (cells as CSR tensors, and their seed key).

    epoch plan (split by node and worker) -> shuffled positions -> skip -> batch of positions ->
    CSR gathered from memory-mapped shards (``pool``) -> ``SparseBatch`` (row pointers, gene ids,
    counts, key) -> [the trainer, on its device] ``tokenize.build_batch``: select, pad, normalise,
    mask, profile

The loader does no tokenization: it reads arrays and hands them on (8 bytes per expressed gene),
and the batch is built where the model runs, from the key the loader gives it.

The shuffle is WebDataset's shuffle buffer applied to cell positions, not to decoded samples, so
a cell's bytes are read once, by the batch that trains on it (see ``pool`` for its memory).

Splitting is by cell, not by shard: an epoch permutes the shard order (seeded by seed and epoch),
lays the cells end to end, and cuts that sequence into ``world_size x streams`` equal runs of whole
batches, one per (rank, stream); a stream is one DataLoader worker (or the main process). Every
rank therefore gets the same number of batches whatever the shard sizes (no rank waits at a
collective), each cell goes to at most one rank, and fewer than ``world_size x streams x
batch_size`` cells (different ones each epoch) are left out. The shards a run reads are contiguous
in the permuted order, so a rank reads about 1/world_size of the data.

Cells shorter than L pad a batch to its longest cell. With ``group`` > 1 a stream takes the
shuffle's cells a window of ``group`` batches at a time, sorts the window by how many genes each
cell shows (``token_counts``) and cuts it into batches served in a seeded order
(``window_order``): at every expressed gene (L in the thousands) a step then costs about what its
genes do, not ``batch x longest cell``.

Randomness is keyed, not carried: the shuffle buffer's seed is (seed, epoch, stream), a batch's
key (``SparseBatch.key``: what seeds its selection, masks and profile where it is built) is
(seed, epoch, stream, batch index), a window's batch order (seed, epoch, stream, window index).
So ``skip_batches`` can drop positions after the shuffle buffer without
reading their cells (a shard all of whose cells were skipped is never opened; of a window it stops
inside, the cells are read for their lengths) and land on exactly the batches an uninterrupted run
would have produced next. The stream depends on the :class:`Layout` (world_size, streams =
num_workers, batch_size, group), seed, epoch and shuffle_buffer.

A run resumed on another layout (a job requeued onto another allocation, another micro-batch or
number of workers) passes the epoch's earlier ``segments`` (each layout and the batches its ranks
consumed): the cells they consumed are found by replaying those streams' shuffles on cell ids (no
data is read), and the rest of the epoch is planned afresh for the new layout, in the same order.
No cell of the epoch is trained twice and none is skipped beyond the last layout's remainder (fewer
than its world_size x streams x batch_size cells; an earlier layout's remainder is planned into the
next).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import webdataset as wds

from scgraph.config import TokenizerConfig
from scgraph.data.batch import SparseBatch
from scgraph.data.handoff import Ring, Slot, slot_bytes
from scgraph.data.pool import CellPool, Run, buffer_mib
from scgraph.data.shards import ShardSet
from scgraph.data.tokenize import GeneChoice, token_counts

DEFAULT_SHUFFLE_BUFFER = 4096
#: Batches a rank's DataLoader keeps ready ahead of the step, split over its workers: enough to ride
#: out a slow batch, few enough that what waits stays a handful of batches of memory.
PREFETCH_BATCHES = 8


@dataclass(frozen=True)
class Layout:
    """How an epoch's cells are split: ``world_size x streams`` streams of whole batches, each
    stream's cells grouped by length in windows of ``group`` batches (1: not grouped)."""

    world_size: int
    streams: int
    batch_size: int
    group: int = 1

    @property
    def n_streams(self) -> int:
        return self.world_size * self.streams


#: Part of an epoch trained on one layout: the layout and the batches each of its ranks consumed.
Segment = tuple[Layout, int]


def epoch_runs(shard_cells: list[int], seed: int, epoch: int) -> list[Run]:
    """The epoch's cell sequence: every shard whole, in a permutation seeded by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_cells))
    return [(int(shard), 0, shard_cells[shard]) for shard in order]


def cut(runs: list[Run], begin: int, end: int) -> list[Run]:
    """The runs holding cells ``[begin, end)`` of the sequence ``runs`` describe."""
    out, offset = [], 0
    for shard, start, stop in runs:
        n = stop - start
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            out.append((shard, start + lo - offset, start + hi - offset))
        offset += n
        if offset >= end:
            break
    return out


def stream_part(runs: list[Run], layout: Layout, stream: int) -> list[Run]:
    """Global stream ``stream``'s share of ``runs``: equal runs of whole batches, end to end."""
    cells = sum(stop - start for _, start, stop in runs)
    per_stream = cells // (layout.n_streams * layout.batch_size) * layout.batch_size
    return cut(runs, stream * per_stream, (stream + 1) * per_stream)


def without(runs: list[Run], taken: dict[int, np.ndarray]) -> list[Run]:
    """``runs`` less the cells in ``taken`` (shard -> sorted cell indices), order kept."""
    out = []
    for shard, start, stop in runs:
        gone = taken.get(shard, np.zeros(0, dtype=np.int64))
        gone = gone[(gone >= start) & (gone < stop)]
        edges = np.concatenate(([start - 1], gone, [stop]))
        out += [(shard, int(a) + 1, int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a + 1]
    return out


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _tail(segment: int) -> list[int]:
    """What a segment adds to a key: nothing for the first, so an epoch on one layout keys as ever."""
    return [segment] if segment else []


def shuffled(n: int, buffer: int, seed: int, epoch: int, stream: int, segment: int) -> Iterator[int]:
    """Positions 0..n-1 of a stream's input in the order its shuffle buffer emits them: WebDataset's
    ``shuffle(buffer, buffer)`` seeded by (seed, epoch, stream[, segment]), as the loader always
    applied it to the cells themselves (so a checkpoint resumes onto the same batches)."""
    positions = iter(range(n))
    if buffer <= 1:
        return positions
    return wds.shuffle(buffer, buffer, seed=_seed(seed, epoch, stream, *_tail(segment)))(positions)


def window_order(keys: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """Where a window's cells (given in shuffle order, ``keys`` their token counts) go: sorted by
    key (ties keep the shuffle's order) and cut into batches, the batches in an order seeded by
    ``seed``, so a step pads its cells to alike lengths and the lengths still come in random order."""
    batches = np.argsort(keys, kind="stable").reshape(-1, batch_size)
    return batches[np.random.default_rng(seed).permutation(len(batches))].ravel()


def _cells_of(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """(shard, cell) of each position of the sequence ``runs`` describe."""
    sizes = [stop - start for _, start, stop in runs]
    shards = np.repeat(np.array([shard for shard, _, _ in runs], dtype=np.int64), sizes)
    cells = np.concatenate([np.arange(start, stop, dtype=np.int64) for _, start, stop in runs] or [np.zeros(0, int)])
    return shards, cells


#: (a stream's runs, positions in them) -> the token counts of those cells (``token_counts``)
KeysOf = Callable[[list[Run], np.ndarray], np.ndarray]


def consumed_cells(runs: list[Run], layout: Layout, batches: int, *, seed: int, epoch: int, segment: int,
                   shuffle_buffer: int, keys_of: KeysOf) -> dict[int, np.ndarray]:
    """The cells (shard -> sorted indices) that ``batches`` batches of every rank took from
    ``runs`` under ``layout``, found by replaying each stream's shuffle on cell ids (and, when
    grouped by length, reading the cells of a window the layout stopped inside, for their keys)."""
    shards, cells = [], []
    size = layout.batch_size
    for stream in range(layout.n_streams):
        local = stream % layout.streams
        windows, inside = divmod(max((batches - local + layout.streams - 1) // layout.streams, 0), layout.group)
        part = stream_part(runs, layout, stream)
        order = shuffled(sum(stop - start for _, start, stop in part), shuffle_buffer, seed, epoch, stream, segment)
        positions = np.fromiter(itertools.islice(order, windows * layout.group * size), dtype=np.int64)
        if inside:
            window = np.fromiter(itertools.islice(order, layout.group * size), dtype=np.int64)
            rows = window_order(keys_of(part, window), size, _seed(seed, epoch, stream, windows, *_tail(segment)))
            positions = np.concatenate((positions, window[rows[:inside * size]]))
        of_shard, of_cell = _cells_of(part)
        shards.append(of_shard[positions])
        cells.append(of_cell[positions])
    shard, cell = np.concatenate(shards), np.concatenate(cells)
    return {int(s): np.sort(cell[shard == s]) for s in np.unique(shard)}

class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches; inside a DataLoader each worker takes one stream.

    The DataLoader asks its workers for batches round-robin, so batch j of a rank comes from
    stream ``j % streams``. After skipping k batches the next one must come from stream
    ``k % streams`` while the DataLoader still starts at worker 0, so worker w plays stream
    ``(w + k) % streams``.
    """

    def __init__(
        self,
        shards: ShardSet,
        tok: TokenizerConfig,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        streams: int,
        shuffle_buffer: int,
        epoch: int,
        skip_batches: int,
        segments: tuple[Segment, ...] = (),
        choice: GeneChoice | None = None,
        group_by_length: int = 1,
        verify: bool = False,
        endless: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if group_by_length < 1:
            raise ValueError(f"group_by_length must be >= 1 (1: cells not grouped); got {group_by_length}")
        if skip_batches < 0 or epoch < 0:
            raise ValueError(f"skip_batches and epoch must be >= 0; got {skip_batches}, {epoch}")
        self.shards, self.tok = shards, tok
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.skip_batches = epoch, skip_batches
        self.choice = choice  # (for the length key of windows, ``token_counts``)
        self.layout = Layout(world_size, streams, batch_size, group_by_length)
        self.segments = tuple(segments)
        self.verify, self.endless = verify, endless
        self._plans: dict[int, list[Run]] = {}
        if shards.n_cells // (self.layout.n_streams * batch_size) == 0:
            raise ValueError(
                f"{shards.directory} holds {shards.n_cells} cells, fewer than one batch per stream: "
                f"world_size {world_size} x streams {streams} x batch_size {batch_size} = "
                f"{world_size * streams * batch_size}"
            )

    def _segment(self, epoch: int) -> int:
        """Which segment of ``epoch`` this stream trains: after the given ones in the first epoch."""
        return len(self.segments) if epoch == self.epoch else 0

    def _plan(self, epoch: int) -> list[Run]:
        """The cells ``epoch`` still has for this layout: all of them, or in the first epoch those
        its earlier segments did not consume."""
        if epoch not in self._plans:
            runs = epoch_runs(self.shards.shard_cells, self.seed, epoch)
            for index, (layout, batches) in enumerate(self.segments if epoch == self.epoch else ()):
                runs = without(runs, consumed_cells(runs, layout, batches, seed=self.seed, epoch=epoch, segment=index,
                                                    shuffle_buffer=self.shuffle_buffer, keys_of=self._keys))
            self._plans = {epoch: runs}
        return self._plans[epoch]

    def batches_in(self, epoch: int) -> int:
        """Batches one rank gets in ``epoch`` (the same on every rank)."""
        cells = sum(stop - start for _, start, stop in self._plan(epoch))
        return cells // (self.layout.n_streams * self.batch_size) * self.streams

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank gets in the first epoch (every epoch, unless earlier segments took some)."""
        return self.batches_in(self.epoch)

    def _keys(self, runs: list[Run], positions: np.ndarray) -> np.ndarray:
        """The token counts of the cells at ``positions`` of ``runs`` (read for it)."""
        pool = CellPool(runs, self.shards.shard_paths, self.shards.shard_cells, self.shards.vocab_size,
                        np.zeros(0, dtype=np.int64))
        return token_counts(pool.take(positions), self.tok, self.choice)

    def _collate(self, epoch: int, stream: int, first_batch: int) -> Callable[[sp.csr_matrix], SparseBatch]:
        """CSR cells -> ``SparseBatch`` keyed (seed, epoch, stream, batch index[, segment]), the
        batch index counted from ``first_batch``."""
        counter = itertools.count(first_batch)
        vocab_size = self.shards.vocab_size
        segment = _tail(self._segment(epoch))

        def collate(counts: sp.csr_matrix) -> SparseBatch:
            return SparseBatch.from_csr(counts, (self.seed, epoch, stream, next(counter), *segment), vocab_size)

        return collate

    def _slices(self, epoch: int, stream: int) -> list[Run]:
        return stream_part(self._plan(epoch), self.layout, self.rank * self.streams + stream)

    def epoch_batches(self, epoch: int, stream: int, skip: int = 0) -> Iterator[SparseBatch]:
        """Batches ``skip..`` of one stream (0 <= stream < streams) of this rank in ``epoch``: the
        shuffle's cells, a window of ``group`` batches at a time (sorted by length when > 1). The
        windows before ``skip`` are never read; one that ``skip`` falls inside is read whole. With
        ``verify``, the shards it reads are checked first (each once per process)."""
        global_stream = self.rank * self.streams + stream
        slices = self._slices(epoch, stream)
        for shard in sorted({shard for shard, _, _ in slices}) if self.verify else ():
            self.shards.check_shard(shard)
        n = sum(stop - start for _, start, stop in slices)
        order = shuffled(n, self.shuffle_buffer, self.seed, epoch, global_stream, self._segment(epoch))
        size, group = self.batch_size, self.layout.group
        windows, inside = divmod(skip, group)
        skipped = np.sort(np.fromiter(itertools.islice(order, windows * group * size), dtype=np.int64))
        pool = CellPool(slices, self.shards.shard_paths, self.shards.shard_cells, self.shards.vocab_size, skipped)
        collate = self._collate(epoch, global_stream, skip)
        for window in itertools.count(windows):
            positions = np.fromiter(itertools.islice(order, group * size), np.int64)
            if not len(positions):  # a stream holds whole batches: the last window may hold fewer
                return
            cells = pool.take(positions)
            if group > 1:
                seed = _seed(self.seed, epoch, global_stream, window, *_tail(self._segment(epoch)))
                cells = cells[window_order(token_counts(cells, self.tok, self.choice), size, seed)]
            for start in range(inside * size if window == windows else 0, len(positions), size):
                yield collate(cells[start:start + size])

    def __iter__(self) -> Iterator[SparseBatch]:
        """This stream's batches of the epoch from ``skip_batches`` on; ``endless``: then every next
        epoch's, so a DataLoader's workers live as long as the run. Batch j after the skip comes from
        worker ``j % streams`` in every epoch (an epoch's batches are a multiple of the streams)."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.skip_batches) % self.streams
        skip = (self.skip_batches + self.streams - 1 - stream) // self.streams
        for epoch in itertools.count(self.epoch) if self.endless else (self.epoch,):
            if epoch > self.epoch or self.skip_batches < self.batches_per_epoch:
                yield from self.epoch_batches(epoch, stream, skip if epoch == self.epoch else 0)


class ShardLoader:
    """What ``build_loader`` returns: iterate it for ``SparseBatch``es (in a DataLoader when
    ``num_workers`` > 0). ``len()`` is the batches left in this epoch.

    With ``verify``, each shard a stream reads is checked against the manifest's sha256 before
    its first batch from it (once per process): a shard damaged after it was written is refused by
    name instead of trained on. With ``pin_memory`` (for a CUDA device) batches arrive in
    page-locked memory, so ``SparseBatch.to`` copies them asynchronously. Workers hand batches
    over through rings of shared memory (``handoff``).

    An ``endless`` loader runs on into the next epochs (``batches_in`` says where each ends), so
    its workers and their rings persist for the whole run."""

    def __init__(self, dataset: ShardStream, num_workers: int, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    @property
    def prefetch(self) -> int:
        """Batches each worker is asked for ahead of the step (its ring holds one more)."""
        return -(-PREFETCH_BATCHES // max(1, self.num_workers))

    @property
    def genes_per_cell(self) -> float:
        """The shards' mean expressed genes per cell (from the manifest)."""
        shards = self.dataset.shards
        return shards.manifest["totals"].get("nnz", 0) / max(shards.n_cells, 1)

    def memory(self) -> str:
        """What each stream holds, in cells and MiB (see ``pool``), and the workers' rings."""
        data = self.dataset
        totals = data.shards.manifest["totals"]
        held = (f"{data.streams} stream(s) per rank, each a shuffle buffer of {data.shuffle_buffer:,} cells (at most "
                f"{buffer_mib(data.shuffle_buffer, self.genes_per_cell):,.0f} MiB held copied out of shards read "
                f"past) and the shard it reads mapped (about {totals['bytes'] / max(totals['shards'], 1) / 2**20:,.0f}"
                " MiB of page cache)")
        if not self.num_workers:
            return held
        slots = self.prefetch + 1
        ring = slots * slot_bytes(data.batch_size, self.genes_per_cell) / 2**20
        return f"{held}; each worker hands batches over through {slots} slots of shared memory ({ring:,.0f} MiB)"

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.dataset.skip_batches)

    def _slot_bytes(self, slots: int) -> int:
        """The workers' slot size; 0 (every batch handed over the usual way, said in one line) where
        their rings would not fit in the shared memory left: a process touching shared memory past
        its end is killed by SIGBUS, and a container's default is 64 MiB."""
        size = slot_bytes(self.dataset.batch_size, self.genes_per_cell)
        needed, free = self.num_workers * slots * size, _free_shared_memory()
        if needed <= free:
            return size
        print(f"scgraph: warning: the loader's {self.num_workers} workers need {needed / 2**20:,.0f} MiB of shared "
              f"memory for their rings and /dev/shm has {free / 2**20:,.0f} MiB free: batches are handed over the "
              "slower way; give it more (docker run --shm-size)", flush=True)
        return 0

    def __iter__(self) -> Iterator[SparseBatch]:
        if self.num_workers == 0:
            return map(SparseBatch.pin_memory, self.dataset) if self.pin_memory else iter(self.dataset)
        context, slots = torch.multiprocessing.get_context(), self.prefetch + 1
        size = self._slot_bytes(slots)
        rings = [Ring(slots, size, context) for _ in range(self.num_workers)]
        return _received(torch.utils.data.DataLoader(
            _Worker(self.dataset, rings), batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
            multiprocessing_context=context), rings, self.pin_memory)


def _free_shared_memory(folder: str = "/dev/shm") -> float:
    """Bytes free where shared memory lives (unbounded where there is no such folder)."""
    if not os.path.isdir(folder):
        return float("inf")
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class _Worker(torch.utils.data.IterableDataset):
    """A worker's batches, each through its ring (``handoff``), then the bad-input error that
    stopped it (if one did) as an item, so the main process raises it as it was: a DataLoader
    would wrap it in a multi-line traceback."""

    def __init__(self, dataset: ShardStream, rings: list[Ring]) -> None:
        super().__init__()
        self.dataset, self.rings = dataset, rings

    def __iter__(self) -> Iterator[Slot | SparseBatch | ValueError | OSError]:
        worker = torch.utils.data.get_worker_info().id
        try:
            for batch in self.dataset:
                yield self.rings[worker].put(batch, worker)
        except (ValueError, OSError) as err:
            yield err


def _received(items: Iterator[Slot | SparseBatch | ValueError | OSError], rings: list[Ring],
              pin: bool) -> Iterator[SparseBatch]:
    """The workers' batches in the main process (page-locked with ``pin``); their errors raised."""
    for item in items:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Slot):
            yield rings[item.worker].take(item, pin)
        else:
            yield item.pin_memory() if pin else item


def build_loader(
    shards: ShardSet | str,
    tok: TokenizerConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    epoch: int = 0,
    skip_batches: int = 0,
    verify: bool = True,
    segments: tuple[Segment, ...] = (),
    choice: GeneChoice | None = None,
    pin_memory: bool = False,
    group_by_length: int = 1,
    endless: bool = False,
) -> ShardLoader:
    """Full batches of cells (``SparseBatch``) for one rank; ``tokenize.build_batch`` makes each a
    model's ``Batch``. Pass ``torch.distributed`` rank and world size; ``skip_batches`` = batches
    already consumed (counted from the start of ``epoch``); ``verify`` checks each shard's sha256
    before it is first read; ``segments``: the earlier parts of ``epoch`` trained on other layouts
    (see the module doc); ``tok`` and ``choice`` (the corpus statistics, ``GeneChoice``): how many
    genes a cell shows, the key of length windows; ``pin_memory``: for a CUDA device;
    ``group_by_length``: windows of that many batches are sorted by length (see ``window_order``);
    ``endless``: on into the next epochs, with the same workers."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    if isinstance(shards, str):
        shards = ShardSet.open(shards)
    dataset = ShardStream(
        shards,
        tok,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        streams=max(1, num_workers),
        shuffle_buffer=shuffle_buffer,
        epoch=epoch,
        skip_batches=skip_batches,
        segments=segments,
        choice=choice,
        group_by_length=group_by_length,
        verify=verify,
        endless=endless,
    )
    return ShardLoader(dataset, num_workers, pin_memory)
