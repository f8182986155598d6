"""The streaming loader: shards -> tokenized, masked ``Batch``es, as a WebDataset stage chain.

    epoch plan (split by node and worker) -> tar samples -> shuffle buffer -> skip -> batch
    (decode, tokenize, mask: each vectorised over the batch)

Splitting is by cell, not by shard: an epoch permutes the shard order (seeded by seed and epoch),
lays the cells end to end, and cuts that sequence into ``world_size x streams`` equal runs of whole
batches, one per (rank, stream); a stream is one DataLoader worker (or the main process). Every
rank therefore gets the same number of batches whatever the shard sizes (no rank waits at a
collective), each cell goes to at most one rank, and fewer than ``world_size x streams x
batch_size`` cells (different ones each epoch) are left out. The shards a run reads are contiguous
in the permuted order, so a rank reads about 1/world_size of the data.

Randomness is keyed, not carried: the shuffle buffer's seed is (seed, epoch, stream), a batch's
tokenize/mask rng is (seed, epoch, stream, batch index). So ``skip_batches`` can drop samples after
the shuffle buffer without tokenizing them and land on exactly the batches an uninterrupted run
would have produced next. The stream depends on the :class:`Layout` (world_size, streams =
num_workers, batch_size), seed, epoch and shuffle_buffer.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

from scgraph.config import TokenizerConfig
from scgraph.data.batch import Batch, make_batch
from scgraph.data.shards import COUNTS, GENES, ShardSet, decode_rows, iter_shard

DEFAULT_SHUFFLE_BUFFER = 4096


#: (shard, start, stop): cells start..stop-1 of a shard, in stored order.
Run = tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    """How an epoch's cells are split: ``world_size x streams`` streams of whole batches."""

    world_size: int
    streams: int
    batch_size: int

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


def _shuffle_stage(buffer: int, seed: int, epoch: int, stream: int, segment: int):
    """The stream's shuffle buffer (None for none); seeded by (seed, epoch, stream[, segment])."""
    if buffer <= 1:
        return None
    return wds.shuffle(buffer, buffer, seed=_seed(seed, epoch, stream, *([segment] if segment else [])))


def consumed_cells(runs: list[Run], layout: Layout, batches: int, *, seed: int, epoch: int, segment: int,
                   shuffle_buffer: int) -> dict[int, np.ndarray]:
    """The cells (shard -> sorted indices) that ``batches`` batches of every rank took from
    ``runs`` under ``layout``, found by replaying each stream's shuffle on cell ids."""
    taken: dict[int, list[int]] = {}
    for stream in range(layout.n_streams):
        local = stream % layout.streams
        count = (batches - local + layout.streams - 1) // layout.streams * layout.batch_size
        ids = ((shard, i) for shard, start, stop in stream_part(runs, layout, stream) for i in range(start, stop))
        stage = _shuffle_stage(shuffle_buffer, seed, epoch, stream, segment)
        for shard, i in itertools.islice(stage(ids) if stage else ids, max(count, 0)):
            taken.setdefault(shard, []).append(i)
    return {shard: np.sort(np.array(cells, dtype=np.int64)) for shard, cells in taken.items()}

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
        mask_ratio: float,
        seed: int,
        rank: int,
        world_size: int,
        streams: int,
        shuffle_buffer: int,
        epoch: int,
        skip_batches: int,
        recon_genes: int | None = None,
        segments: tuple[Segment, ...] = (),
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if skip_batches < 0 or epoch < 0:
            raise ValueError(f"skip_batches and epoch must be >= 0; got {skip_batches}, {epoch}")
        self.shards, self.tok = shards, tok
        self.batch_size, self.mask_ratio, self.seed = batch_size, mask_ratio, seed
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.skip_batches = epoch, skip_batches
        self.recon_genes = recon_genes
        self.layout = Layout(world_size, streams, batch_size)
        self.segments = tuple(segments)
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
                runs = without(runs, consumed_cells(runs, layout, batches, seed=self.seed, epoch=epoch,
                                                    segment=index, shuffle_buffer=self.shuffle_buffer))
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

    def _collate(self, epoch: int, stream: int, first_batch: int):
        counter = itertools.count(first_batch)
        vocab_size = self.shards.vocab_size
        segment = [self._segment(epoch)] if self._segment(epoch) else []

        def collate(samples: list[dict[str, Any]]) -> Batch:
            counts = decode_rows(samples, vocab_size)
            rng = np.random.default_rng([self.seed, epoch, stream, next(counter), *segment])
            return make_batch(counts, self.tok, vocab_size, self.mask_ratio, rng, self.recon_genes)

        return collate

    def _slices(self, epoch: int, stream: int) -> list[Run]:
        return stream_part(self._plan(epoch), self.layout, self.rank * self.streams + stream)

    def epoch_shards(self, epoch: int) -> list[int]:
        """The shards this rank reads in ``epoch`` (all its streams)."""
        return sorted({shard for s in range(self.streams) for shard, _, _ in self._slices(epoch, s)})

    def epoch_batches(self, epoch: int, stream: int, skip: int = 0) -> Iterator[Batch]:
        """Batches ``skip..`` of one stream (0 <= stream < streams) of this rank in ``epoch``."""
        global_stream = self.rank * self.streams + stream
        slices = self._slices(epoch, stream)
        paths = self.shards.shard_paths
        stages: list[Any] = [lambda: _read(slices, paths)]
        shuffle = _shuffle_stage(self.shuffle_buffer, self.seed, epoch, global_stream, self._segment(epoch))
        if shuffle is not None:
            stages.append(shuffle)
        stages += [
            lambda samples: itertools.islice(samples, skip * self.batch_size, None),
            wds.batched(
                self.batch_size, collation_fn=self._collate(epoch, global_stream, skip), partial=False
            ),
        ]
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if self.skip_batches >= self.batches_per_epoch:
            return
        stream = (worker + self.skip_batches) % self.streams
        skip = (self.skip_batches + self.streams - 1 - stream) // self.streams
        yield from self.epoch_batches(self.epoch, stream, skip)


def _read(slices: list[Run], paths: list[str]) -> Iterator[dict[str, Any]]:
    """The samples of ``slices`` in order; consecutive runs of one shard (what is left of it after
    an earlier segment took cells here and there) in one pass over the file."""
    for shard, group in itertools.groupby(slices, key=lambda run: run[0]):
        runs = list(group)
        lo, hi = runs[0][1], runs[-1][2]
        if len(runs) == 1:
            yield from iter_shard(paths[shard], lo, hi, (GENES, COUNTS))
            continue
        keep = np.zeros(hi - lo, dtype=bool)
        for _, start, stop in runs:
            keep[start - lo:stop - lo] = True
        for wanted, sample in zip(keep, iter_shard(paths[shard], lo, hi, (GENES, COUNTS))):
            if wanted:
                yield sample


class ShardLoader:
    """What ``build_loader`` returns: iterate it for ``Batch``es (in a DataLoader when
    ``num_workers`` > 0). ``len()`` is the batches left in this epoch.

    With ``verify``, each shard this rank will read is checked against the manifest's sha256
    before the first batch (once per ShardSet object, so once per run): a shard damaged after it
    was written is refused by name instead of trained on."""

    def __init__(self, dataset: ShardStream, num_workers: int, verify: bool) -> None:
        self.dataset, self.num_workers, self.verify = dataset, num_workers, verify

    def _check_shards(self) -> None:
        data = self.dataset
        for index in data.epoch_shards(data.epoch):
            data.shards.check_shard(index)

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.dataset.skip_batches)

    def __iter__(self) -> Iterator[Batch]:
        if self.verify:
            self._check_shards()
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4
            )
        )


def build_loader(
    shards: ShardSet | str,
    tok: TokenizerConfig,
    *,
    batch_size: int,
    mask_ratio: float,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    epoch: int = 0,
    skip_batches: int = 0,
    verify: bool = True,
    recon_genes: int | None = None,
    segments: tuple[Segment, ...] = (),
) -> ShardLoader:
    """Full batches of tokenized, masked cells for one rank. Pass ``torch.distributed`` rank and
    world size; ``skip_batches`` = batches already consumed (counted from the start of ``epoch``);
    ``verify`` checks each shard's sha256 before it is first read; ``recon_genes`` adds each cell's
    profile for the recon objective (that many unexpressed genes); ``segments``: the earlier parts of
    ``epoch`` trained on other layouts (see the module doc)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    if isinstance(shards, str):
        shards = ShardSet.open(shards)
    dataset = ShardStream(
        shards,
        tok,
        batch_size=batch_size,
        mask_ratio=mask_ratio,
        seed=seed,
        rank=rank,
        world_size=world_size,
        streams=max(1, num_workers),
        shuffle_buffer=shuffle_buffer,
        epoch=epoch,
        skip_batches=skip_batches,
        recon_genes=recon_genes,
        segments=segments,
    )
    return ShardLoader(dataset, num_workers, verify)
