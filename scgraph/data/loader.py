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
would have produced next. The stream depends on (seed, epoch, rank, world_size, num_workers,
batch_size, shuffle_buffer): resume with the same values.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds

from scgraph.config import TokenizerConfig
from scgraph.data.batch import Batch, make_batch
from scgraph.data.shards import COUNTS, GENES, ShardSet, decode_rows, iter_shard

DEFAULT_SHUFFLE_BUFFER = 4096


def stream_slices(
    shard_cells: list[int], *, seed: int, epoch: int, stream: int, cells_per_stream: int
) -> list[tuple[int, int, int]]:
    """(shard, start, stop) runs holding cells ``[stream * c, (stream + 1) * c)`` of the epoch's
    sequence (shards in a seeded permutation, cells in stored order); c = ``cells_per_stream``."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_cells))
    begin, end = stream * cells_per_stream, (stream + 1) * cells_per_stream
    out, offset = [], 0
    for shard in order:
        n = shard_cells[shard]
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            out.append((int(shard), lo - offset, hi - offset))
        offset += n
        if offset >= end:
            break
    return out


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


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
        resampled: bool,
        epoch: int,
        skip_batches: int,
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
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.epoch, self.skip_batches = epoch, skip_batches
        self.batches_per_stream = shards.n_cells // (world_size * streams * batch_size)
        if self.batches_per_stream == 0:
            raise ValueError(
                f"{shards.directory} holds {shards.n_cells} cells, fewer than one batch per stream: "
                f"world_size {world_size} x streams {streams} x batch_size {batch_size} = "
                f"{world_size * streams * batch_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank gets per epoch (the same on every rank)."""
        return self.batches_per_stream * self.streams

    def _collate(self, epoch: int, stream: int, first_batch: int):
        counter = itertools.count(first_batch)
        vocab_size = self.shards.vocab_size

        def collate(samples: list[dict[str, Any]]) -> Batch:
            counts = decode_rows(samples, vocab_size)
            rng = np.random.default_rng([self.seed, epoch, stream, next(counter)])
            return make_batch(counts, self.tok, vocab_size, self.mask_ratio, rng)

        return collate

    def _slices(self, epoch: int, stream: int) -> list[tuple[int, int, int]]:
        return stream_slices(self.shards.shard_cells, seed=self.seed, epoch=epoch,
                             stream=self.rank * self.streams + stream,
                             cells_per_stream=self.batches_per_stream * self.batch_size)

    def epoch_shards(self, epoch: int) -> list[int]:
        """The shards this rank reads in ``epoch`` (all its streams)."""
        return sorted({shard for s in range(self.streams) for shard, _, _ in self._slices(epoch, s)})

    def epoch_batches(self, epoch: int, stream: int, skip: int = 0) -> Iterator[Batch]:
        """Batches ``skip..`` of one stream (0 <= stream < streams) of this rank in ``epoch``."""
        global_stream = self.rank * self.streams + stream
        slices = self._slices(epoch, stream)
        paths = self.shards.shard_paths
        stages: list[Any] = [
            lambda: (
                s for shard, lo, hi in slices for s in iter_shard(paths[shard], lo, hi, (GENES, COUNTS))
            ),
        ]
        if self.shuffle_buffer > 1:
            stages.append(
                wds.shuffle(
                    self.shuffle_buffer, self.shuffle_buffer, seed=_seed(self.seed, epoch, global_stream)
                )
            )
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
        per_epoch = self.batches_per_epoch
        if not self.resampled and self.skip_batches >= per_epoch:
            return
        first_epoch, within = divmod(self.skip_batches, per_epoch)
        stream = (worker + within) % self.streams
        skip = (within + self.streams - 1 - stream) // self.streams
        epochs = itertools.count(self.epoch + first_epoch) if self.resampled else [self.epoch]
        for i, epoch in enumerate(epochs):
            yield from self.epoch_batches(epoch, stream, skip if i == 0 else 0)


class ShardLoader:
    """What ``build_loader`` returns: iterate it for ``Batch``es (in a DataLoader when
    ``num_workers`` > 0). ``len()`` is the batches left in this epoch (not for ``resampled``).

    With ``verify``, each shard this rank will read is checked against the manifest's sha256
    before the first batch (once per ShardSet object, so once per run): a shard damaged after it
    was written is refused by name instead of trained on."""

    def __init__(self, dataset: ShardStream, num_workers: int, verify: bool) -> None:
        self.dataset, self.num_workers, self.verify = dataset, num_workers, verify

    def _check_shards(self) -> None:
        data = self.dataset
        if data.resampled:
            shards = range(len(data.shards.shard_cells))
        else:
            shards = data.epoch_shards(data.epoch + data.skip_batches // data.batches_per_epoch)
        for index in shards:
            data.shards.check_shard(index)

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def __len__(self) -> int:
        if self.dataset.resampled:
            raise TypeError("a resampled loader is endless and has no len()")
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
    resampled: bool = False,
    epoch: int = 0,
    skip_batches: int = 0,
    verify: bool = True,
) -> ShardLoader:
    """Full batches of tokenized, masked cells for one rank. Pass ``torch.distributed`` rank and
    world size; ``skip_batches`` = batches already consumed (counted from the start of ``epoch``,
    across epochs when ``resampled``); ``resampled`` streams successive reshuffled epochs endlessly;
    ``verify`` checks each shard's sha256 before it is first read."""
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
        resampled=resampled,
        epoch=epoch,
        skip_batches=skip_batches,
    )
    return ShardLoader(dataset, num_workers, verify)
