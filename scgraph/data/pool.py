"""One stream's cells, served as CSR batches in any order the shuffle asks for.

A stream's input is its runs of cells laid end to end; a cell is named by its position in that
sequence. The shuffle is computed on positions alone (it never looks at a cell), so the bytes of a
cell are touched once, when the batch that holds it is gathered: each shard the stream reads is
memory-mapped and its tar headers parsed into offsets once (``read_shard_arrays``), and a batch is
one ragged ``take`` per shard it draws from. No Python object per cell on the path.

Memory: the shuffle buffer holds ``shuffle_buffer`` positions (8 bytes each); cell bytes stay in
the page cache of the mapped shards, which are unmapped once every cell the stream reads from them
was served. A cell waits in the buffer about ``shuffle_buffer`` draws on average and rarely more
than ``shuffle_buffer * ln(shuffle_buffer)``, so the shards of about that many cells (plus the
shard being read) are mapped at a time: ``mapped_cells`` says how many, for a stated bound in MiB.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.sparse as sp

from scgraph.data.shards import CorruptShardError, ShardArrays, ranges, read_shard_arrays

#: (shard, start, stop): cells start..stop-1 of a shard, in stored order.
Run = tuple[int, int, int]


def mapped_cells(shuffle_buffer: int, shard_cells: int) -> int:
    """About the most cells whose shards a stream keeps mapped: the shuffle's reach back (a buffer
    of b cells rarely holds one older than b ln b draws) plus the shards at each end of it."""
    reach = shuffle_buffer * max(1.0, math.log(max(shuffle_buffer, 1)))
    return int(reach) + 2 * shard_cells


class CellPool:
    """The cells of ``runs`` (a stream's input), read by position on demand from ``paths``, which
    hold ``shard_cells`` cells each (as the manifest says). ``skipped``: positions never served (a
    resumed stream's earlier batches): a shard all of whose cells were skipped is never opened."""

    def __init__(self, runs: list[Run], paths: list[str], shard_cells: list[int], n_genes: int,
                 skipped: np.ndarray) -> None:
        self.paths, self.shard_cells, self.n_genes = paths, shard_cells, n_genes
        # consecutive runs of one shard (what an earlier segment left of it) are one group: one mapping
        self.groups: list[tuple[int, np.ndarray]] = []  # (shard, its cell for each position of the group)
        for shard, group in itertools.groupby(runs, key=lambda run: run[0]):
            cells = [np.arange(start, stop, dtype=np.int64) for _, start, stop in group]
            self.groups.append((shard, np.concatenate(cells)))
        sizes = np.array([len(cells) for _, cells in self.groups], dtype=np.int64)
        self.ends = np.cumsum(sizes)  # group k holds positions ends[k-1] .. ends[k]-1
        skipped_per_group = np.bincount(np.searchsorted(self.ends, skipped, side="right"), minlength=len(sizes))
        self.left = sizes - skipped_per_group[: len(sizes)]  # positions of each group still to serve
        self.open: dict[int, ShardArrays] = {}

    def take(self, positions: np.ndarray) -> sp.csr_matrix:
        """The cells at ``positions`` (each served at most once) as one CSR matrix, in that order."""
        group = np.searchsorted(self.ends, positions, side="right")
        starts = np.concatenate(([0], self.ends[:-1]))
        lengths = np.zeros(len(positions), dtype=np.int64)
        parts = []
        for k in np.unique(group).tolist():
            rows = np.flatnonzero(group == k)
            shard, cells = self.groups[k]
            if k not in self.open:
                self.open[k] = self._read(shard)
            part = self.open[k].rows(cells[positions[rows] - starts[k]], self.n_genes)
            lengths[rows] = np.diff(part.indptr)
            parts.append((rows, part))
            self.left[k] -= len(rows)
            if self.left[k] == 0:
                del self.open[k]  # unmapped: every cell the stream reads from it was served
        if len(parts) == 1:
            return parts[0][1]
        indptr = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        genes, counts = np.empty(indptr[-1], dtype=np.int32), np.empty(indptr[-1], dtype=np.float32)
        for rows, part in parts:
            at = ranges(indptr[rows], lengths[rows], part.indptr)
            genes[at], counts[at] = part.indices, part.data
        return sp.csr_matrix((counts, genes, indptr), shape=(len(positions), self.n_genes))

    def _read(self, shard: int) -> ShardArrays:
        arrays = read_shard_arrays(self.paths[shard])
        if len(arrays.lengths) != self.shard_cells[shard]:
            raise CorruptShardError(f"{arrays.where}: holds {len(arrays.lengths)} cells, the manifest says "
                                    f"{self.shard_cells[shard]}; find every bad shard with python -m sharding verify")
        return arrays
