"""One stream's cells, served as CSR batches in any order the shuffle asks for.

A stream's input is its runs of cells laid end to end; a cell is named by its position in that
sequence. The shuffle is computed on positions alone (it never looks at a cell), so the bytes of a
cell are touched when the batch that holds it is gathered: each shard the stream reads is
memory-mapped and its tar headers parsed into offsets once (``read_shard_arrays``), and a batch is
one ragged ``take`` per shard it draws from. No Python object per cell on the path.

Memory, per stream: the shuffle buffer's positions (8 bytes per cell), the shard being read
(mapped: page cache), and the cells still waiting in the buffer from shards read past, copied out
of them when the stream moves on so that those are unmapped, and copied again whenever fewer than
half of a copy's cells still wait: at most 2 x ``shuffle_buffer`` cells, 8 bytes per expressed gene
each. (A cell waits about ``shuffle_buffer`` draws on average, but a few wait ten times longer: one
would otherwise keep a whole shard, or a whole copy, alive.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scgraph.data.shards import CorruptShardError, ShardArrays, join_rows, read_shard_arrays

#: (shard, start, stop): cells start..stop-1 of a shard, in stored order.
Run = tuple[int, int, int]


def buffer_mib(shuffle_buffer: int, genes_per_cell: float) -> float:
    """The most the cells copied out of shards read past take (MiB): twice a full buffer of them."""
    return 2 * shuffle_buffer * (8 * genes_per_cell + 24) / 2**20


@dataclass
class _Open:
    """A group being served: its cells as arrays, and where each of its positions is in them (-1
    once served or skipped)."""

    arrays: ShardArrays
    row: np.ndarray
    left: int
    mapped: bool = True


class CellPool:
    """The cells of ``runs`` (a stream's input), read by position on demand from ``paths``, which
    hold ``shard_cells`` cells each (as the manifest says). ``skipped``: positions never served (a
    resumed stream's earlier batches): a shard all of whose cells were skipped is never opened."""

    def __init__(self, runs: list[Run], paths: list[str], shard_cells: list[int], n_genes: int,
                 skipped: np.ndarray) -> None:
        self.paths, self.shard_cells, self.n_genes, self.skipped = paths, shard_cells, n_genes, skipped
        # consecutive runs of one shard (what an earlier segment left of it) are one group: one mapping
        self.groups: list[tuple[int, np.ndarray]] = []  # (shard, its cell for each position of the group)
        for shard, group in itertools.groupby(runs, key=lambda run: run[0]):
            cells = [np.arange(start, stop, dtype=np.int64) for _, start, stop in group]
            self.groups.append((shard, np.concatenate(cells)))
        self.ends = np.cumsum([len(cells) for _, cells in self.groups], dtype=np.int64)
        self.starts = self.ends - [len(cells) for _, cells in self.groups]
        self.open: dict[int, _Open] = {}
        self.reached = 0  # every position before this one has entered the shuffle buffer

    def take(self, positions: np.ndarray) -> sp.csr_matrix:
        """The cells at ``positions`` (each served at most once) as one CSR matrix, in that order."""
        self.reached = max(self.reached, int(positions.max(initial=-1)) + 1)
        group = np.searchsorted(self.ends, positions, side="right")
        genes: list[np.ndarray] = [np.zeros(0, np.uint32)] * len(positions)
        counts = list(genes)
        where = []
        for k in np.unique(group).tolist():
            rows = np.flatnonzero(group == k)
            cells = self._open(k)
            offsets = positions[rows] - self.starts[k]
            for row, g, c in zip(rows.tolist(), *cells.arrays.views(cells.row[offsets])):
                genes[row], counts[row] = g, c
            cells.row[offsets] = -1
            cells.left -= len(rows)
            where.append(cells.arrays.where)
        batch = join_rows(genes, counts, self.n_genes, ", ".join(where))
        self._move_on()
        return batch

    def _open(self, k: int) -> _Open:
        if k not in self.open:
            shard, cells = self.groups[k]
            arrays = read_shard_arrays(self.paths[shard])
            if len(arrays.lengths) != self.shard_cells[shard]:
                raise CorruptShardError(f"{arrays.where}: holds {len(arrays.lengths)} cells, the manifest says "
                                        f"{self.shard_cells[shard]}; find every bad shard with python -m sharding "
                                        "verify")
            row = cells.copy()
            skipped = self.skipped[(self.skipped >= self.starts[k]) & (self.skipped < self.ends[k])]
            row[skipped - self.starts[k]] = -1
            self.open[k] = _Open(arrays, row, int((row >= 0).sum()))
        return self.open[k]

    def _move_on(self) -> None:
        """Close what is served; copy the cells still waiting out of each shard the stream has
        read past (all of its cells entered the buffer), and unmap it; copy them again out of a
        copy less than half of whose cells still wait."""
        for k, cells in list(self.open.items()):
            if cells.left == 0:
                del self.open[k]
            elif (self.ends[k] <= self.reached) if cells.mapped else (2 * cells.left < len(cells.arrays.lengths)):
                waiting = np.flatnonzero(cells.row >= 0)
                kept = cells.arrays.rows(cells.row[waiting], self.n_genes)
                cells.arrays = ShardArrays.in_memory(kept.indptr, kept.indices, kept.data, cells.arrays.where)
                cells.row[waiting] = np.arange(len(waiting))
                cells.mapped = False
