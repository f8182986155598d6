"""The two units of the training path: what the loader hands over and what the model consumes.

``SparseBatch``: a block of cells as the shards store them (row pointers, gene ids, raw counts)
plus the key that seeds everything random about the batch. It is small (8 bytes per expressed gene)
and is what crosses from the loader's processes to the device. ``Batch``: the tokenized, masked
cells (and the recon objective's profiles) as dense (cells x tokens) tensors, built from a
``SparseBatch`` where the model runs (``scgraph.data.tokenize.build_batch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.io.counts import check_counts


@dataclass
class Batch:
    genes: torch.Tensor  # (B, L) int64
    values: torch.Tensor  # (B, L) float32, the true values (targets at masked positions)
    masked: torch.Tensor  # (B, L) bool, positions to predict
    # what the recon objective scores (B, S): gene ids, their values, their weights; None without it
    profile_genes: torch.Tensor | None = None
    profile_values: torch.Tensor | None = None
    profile_weight: torch.Tensor | None = None

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(**{f.name: None if (t := getattr(self, f.name)) is None else change(t)
                        for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str) -> Batch:
        """On ``device``; a tensor already there is the same tensor (no copy). From pinned memory
        to CUDA the copies are asynchronous (the step's first kernel waits for them, not the host)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.genes.shape[0]

    def __getitem__(self, cells: slice) -> Batch:
        """These cells (rows) of the batch."""
        return Batch(*(None if t is None else t[cells] for t in dataclasses.astuple(self)))


@dataclass
class SparseBatch:
    """Cells as CSR tensors: cell i holds ``genes[indptr[i]:indptr[i + 1]]`` (ascending ids, no
    repeats) with ``counts`` the same slice (raw, non-zero); ``key`` seeds the batch's gene
    selection, dropout, masks and profile draws (``generator``); ``longest`` is the most genes a
    cell holds, known on the host so that laying the cells out on a GPU reads nothing back. No cells
    x vocabulary array: the census has 60,664 genes and a cell about 2,000 of them."""

    indptr: torch.Tensor  # (B + 1,) int64
    genes: torch.Tensor  # (nnz,) int32: half the bytes of int64 to copy; widened on the device
    counts: torch.Tensor  # (nnz,) float32
    key: tuple[int, ...]
    longest: int

    @classmethod
    def from_csr(cls, matrix: sp.spmatrix, key: tuple[int, ...] | list[int], vocab_size: int) -> SparseBatch:
        """The rows of ``matrix`` (cells x genes, raw counts) in canonical form (duplicates summed,
        ids sorted, zeros dropped), checked on the host, where a bad cell is one clear error."""
        matrix = sp.csr_matrix(matrix)
        if matrix.shape[1] > vocab_size:
            raise ValueError(f"counts have {matrix.shape[1]} gene columns but the vocabulary has {vocab_size}")
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        check_counts(matrix, integers=False)
        return cls(torch.from_numpy(matrix.indptr.astype(np.int64)),
                   torch.from_numpy(matrix.indices.astype(np.int32, copy=False)),
                   torch.from_numpy(matrix.data.astype(np.float32, copy=False)), tuple(int(k) for k in key),
                   int(np.diff(matrix.indptr).max(initial=0)))

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> SparseBatch:
        return SparseBatch(change(self.indptr), change(self.genes), change(self.counts), self.key, self.longest)

    def to(self, device: torch.device | str) -> SparseBatch:
        """On ``device`` (asynchronous from pinned memory to CUDA, as ``Batch.to``)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> SparseBatch:
        """In page-locked memory (what a DataLoader with ``pin_memory`` calls on each batch)."""
        return self._map(torch.Tensor.pin_memory)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def __len__(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def seed(self) -> int:
        """A 64-bit seed drawn from ``key``."""
        return int(np.random.SeedSequence(list(self.key)).generate_state(1, np.uint64)[0])

    def generator(self) -> torch.Generator:
        """A generator on the batch's device seeded from ``key``: the same key gives the same draws
        on a given device (a CUDA generator draws other numbers than the CPU's)."""
        return torch.Generator(self.device).manual_seed(self.seed)
