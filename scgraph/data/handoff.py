"""How a DataLoader worker hands its batches to the main process: through slots of shared memory
made once per loader (the trainer's lives as long as the run), not a fresh segment per tensor.

Sent the usual way, every tensor of every batch becomes a new shared-memory segment that the worker
faults in page by page and the main process fetches by descriptor over a socket: about 4 ms for a
4 MB batch (2,000 genes x 256 cells) on the 2-core machine, two thirds of what reading its cells
from the shards costs, so two workers delivered fewer cells per second than none. Here the main
process maps one ``Ring`` of slots per worker before the workers start; a worker copies a batch
into its next free slot and sends only where it lies (``Slot``); the main process copies it out
(into page-locked memory for a CUDA device) and frees the slot: under 1 ms per batch.

A worker has at most ``prefetch_factor`` batches asked of it that the main process has not taken,
and the main process frees a slot as soon as it takes the batch, so ``prefetch_factor + 1`` slots
never all hold batches (the semaphore makes that a wait, never an overwrite). A batch larger than
a slot (sized at twice the mean cell's genes, which a length-sorted window's longest batch stays
under on the census-density sets measured) goes the usual way.
"""

from __future__ import annotations

import multiprocessing.context
from dataclasses import dataclass

import numpy as np
import torch

from scgraph.data.batch import SparseBatch

#: Slot room per cell, as a multiple of the shards' mean expressed genes per cell.
HEADROOM = 2
#: A slot's parts, in order: row pointers, gene ids, counts.
PARTS = (torch.int64, torch.int32, torch.float32)


@dataclass(frozen=True)
class Slot:
    """Where a worker left a batch: ring ``worker``, slot ``index``; the rest is the batch's."""

    worker: int
    index: int
    cells: int
    nnz: int
    key: tuple[int, ...]
    longest: int


def slot_bytes(batch_size: int, genes_per_cell: float) -> int:
    """A slot's size: a batch of ``batch_size`` cells of ``HEADROOM`` x ``genes_per_cell`` genes
    (int64 row pointers, int32 gene ids, float32 counts), a multiple of 8 bytes."""
    return 8 * (batch_size + 1) + 8 * batch_size * max(1, int(HEADROOM * genes_per_cell))


class Ring:
    """One worker's slots, in shared memory mapped by the main process before the worker starts
    (inherited on fork, passed by descriptor on spawn)."""

    def __init__(self, slots: int, size: int, context: multiprocessing.context.BaseContext) -> None:
        self.memory = torch.empty((slots, size), dtype=torch.uint8).share_memory_()
        self.free = context.Semaphore(slots)
        self._next = 0

    def _views(self, index: int, cells: int, nnz: int) -> tuple[torch.Tensor, ...]:
        """Slot ``index`` as the row pointers, gene ids and counts of a batch of that shape."""
        row, views, offset = self.memory[index], [], 0
        for length, dtype in zip((cells + 1, nnz, nnz), PARTS):
            views.append(row[offset:offset + length * dtype.itemsize].view(dtype))
            offset += length * dtype.itemsize
        return tuple(views)

    def put(self, batch: SparseBatch, worker: int) -> Slot | SparseBatch:
        """(In the worker.) The batch copied into the next slot, once the main process has freed
        it; a batch too large for a slot is returned as it is."""
        cells, nnz = len(batch), batch.genes.numel()
        if 8 * (cells + 1 + nnz) > self.memory.shape[1]:
            return batch
        self.free.acquire()
        index, self._next = self._next, (self._next + 1) % self.memory.shape[0]
        for part, tensor in zip(self._views(index, cells, nnz), (batch.indptr, batch.genes, batch.counts)):
            np.copyto(part.numpy(), tensor.numpy())
        return Slot(worker, index, cells, nnz, batch.key, batch.longest)

    def take(self, slot: Slot, pin: bool) -> SparseBatch:
        """(In the main process.) The slot's batch copied out, page-locked with ``pin``; the slot
        is free again. Copies go through numpy: a torch copy this size wakes the main process's
        OpenMP threads, whose spinning took the cores the workers needed (2 workers: 36k instead of
        47k cells/s)."""
        parts = self._views(slot.index, slot.cells, slot.nnz)
        indptr, genes, counts = (torch.empty_like(part, pin_memory=pin) for part in parts)
        for part, out in zip(parts, (indptr, genes, counts)):
            np.copyto(out.numpy(), part.numpy())
        self.free.release()
        return SparseBatch(indptr, genes, counts, slot.key, slot.longest)
