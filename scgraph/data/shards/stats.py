"""Per-gene statistics of a shard set, recorded in its manifest: what token selection and the
decoder's starting bias need to know about the corpus, without reading a sample of it at start-up.

All statistics are of the tokenizer's default normalisation, log1p of counts per 10,000 (the
library size over every gene of the cell), and they stream: a pass over the shards, one block of
cells at a time, accumulates per gene the number of expressing cells, the sum and the sum of
squares of its non-zero values, and a histogram of its non-zero values for the median. The sums are
kept in fixed point (integers, steps of 2^-20 for values and 2^-16 for squares), so they add exactly
in any order: a merge of slices records byte for byte what one writer records, and the mean and
the variance over all cells, zeros included, are exact to those steps.

The median (the middle value; of an even count, the lower of the two) is not exact: it is read off
the histogram (``BINS`` bins of width ``1 / BINS_PER_UNIT`` over log1p values in [0, 16), linear
within a bin), so it lies within one bin, 1/32 in log1p units (about 3 % of the normalised value),
of the exact one. An exact median would need every non-zero value of a gene in memory at once,
billions for the census.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scgraph.data.shards.codec import read_shard_arrays
from scgraph.io.counts import log1p_normalized
from scgraph.io.files import write_atomic

#: The one normalisation the statistics describe (the tokenizer's default).
STATS_TARGET_SUM = 1e4
NORMALIZATION = "log1p of counts per 10,000"
#: The file beside the manifest holding the sums and histograms that ``merge`` adds.
STATS_FILE = "gene_stats.npz"
BINS_PER_UNIT = 32
BINS = 512  # log1p values up to 16: a CP10k of 8.9 million, beyond any count a cell holds
MEDIAN_METHOD = (f"histogram of log1p CP10k, {BINS} bins of width 1/{BINS_PER_UNIT}, linear interpolation within "
                 "the median's bin (within 1/32 of the exact median)")
#: Fixed-point scales of the sums of values and of squares (values are below 16: a census-sized
#: corpus stays far inside int64).
VALUE_SCALE, SQUARE_SCALE = 2**20, 2**16
#: Variance-ranked genes are compared on log1p CP10k over all cells, zeros included.
VARIANCE_METHOD = "variance of log1p CP10k over all cells, zeros included (exact)"


@dataclass
class GeneStats:
    """Sufficient statistics over ``cells`` cells for a vocabulary of ``len(expressing)`` genes;
    ``histogram`` (genes x BINS, CSR) counts each gene's non-zero log1p CP10k values by bin."""

    cells: int
    expressing: np.ndarray  # (G,) int64
    total: np.ndarray  # (G,) int64, sum of non-zero log1p CP10k values in units of 1 / VALUE_SCALE
    total_sq: np.ndarray  # (G,) int64, sum of their squares in units of 1 / SQUARE_SCALE
    histogram: sp.csr_matrix  # (G, BINS) int64

    @classmethod
    def empty(cls, vocab_size: int) -> GeneStats:
        zeros = np.zeros(vocab_size, dtype=np.int64)
        return cls(0, zeros, zeros.copy(), zeros.copy(), sp.csr_matrix((vocab_size, BINS), dtype=np.int64))

    @classmethod
    def of(cls, counts: sp.csr_matrix) -> GeneStats:
        """The statistics of one block of cells (cells x vocabulary CSR of raw counts)."""
        counts = sp.csr_matrix(counts)
        vocab_size = counts.shape[1]
        values = log1p_normalized(counts, STATS_TARGET_SUM).astype(np.float64)
        genes = counts.indices
        bins = np.minimum((values * BINS_PER_UNIT).astype(np.int64), BINS - 1)
        histogram = sp.csr_matrix((np.ones(values.size, dtype=np.int64), (genes, bins)), shape=(vocab_size, BINS))
        histogram.sum_duplicates()
        def fixed(x: np.ndarray) -> np.ndarray:  # (float64 sums of integers below 2^53: exact)
            return np.bincount(genes, weights=np.rint(x), minlength=vocab_size).astype(np.int64)

        return cls(counts.shape[0], np.bincount(genes, minlength=vocab_size).astype(np.int64),
                   fixed(values * VALUE_SCALE), fixed(values**2 * SQUARE_SCALE), histogram)

    def __add__(self, other: GeneStats) -> GeneStats:
        if len(self.expressing) != len(other.expressing):
            raise ValueError(f"gene statistics of {len(self.expressing)} and {len(other.expressing)} genes do not add")
        return GeneStats(self.cells + other.cells, self.expressing + other.expressing, self.total + other.total,
                         self.total_sq + other.total_sq, self.histogram + other.histogram)

    @classmethod
    def over(cls, blocks: Iterable[sp.csr_matrix], vocab_size: int) -> GeneStats:
        """Accumulated over ``blocks`` (streamed: one block in memory at a time)."""
        stats = cls.empty(vocab_size)
        for block in blocks:
            stats = stats + cls.of(block)
        return stats

    def mean_nonzero(self) -> np.ndarray:
        """Each gene's mean non-zero value (0 for a gene no cell expresses)."""
        return np.divide(self.total / VALUE_SCALE, self.expressing, out=np.zeros(len(self.total)),
                         where=self.expressing > 0)

    def median_nonzero(self) -> np.ndarray:
        """Each gene's median non-zero value, from its histogram (see the module doc); 0 when unexpressed."""
        hist = self.histogram.tocsr()
        hist.sort_indices()
        out = np.zeros(len(self.expressing))
        if not hist.nnz:
            return out
        rows = np.repeat(np.arange(hist.shape[0]), np.diff(hist.indptr))
        cumulative = np.cumsum(hist.data)
        base = np.concatenate(([0], cumulative))[hist.indptr[:-1]]
        within = cumulative - base[rows]  # each gene's running count over its bins
        half = self.expressing / 2.0
        at = np.flatnonzero(within >= half[rows])
        genes, first = np.unique(rows[at], return_index=True)  # the bin holding each gene's middle value
        k = at[first]
        before = within[k] - hist.data[k]
        out[genes] = (hist.indices[k] + (half[genes] - before) / hist.data[k]) / BINS_PER_UNIT
        return out

    def variance(self) -> np.ndarray:
        """Each gene's variance over all cells, zeros included (exact)."""
        n = max(self.cells, 1)
        mean = self.total / VALUE_SCALE / n
        return np.maximum(self.total_sq / SQUARE_SCALE / n - mean**2, 0.0)

    # -- on disk -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the manifest records (readable, one entry per gene of the vocabulary)."""
        return {"normalization": NORMALIZATION, "cells": int(self.cells), "median_method": MEDIAN_METHOD,
                "variance_method": VARIANCE_METHOD, "expressing": self.expressing.tolist(),
                "mean_nonzero": np.round(self.mean_nonzero(), 6).tolist(),
                "median_nonzero": np.round(self.median_nonzero(), 6).tolist(),
                "variance": np.round(self.variance(), 6).tolist()}

    def save(self, path: str) -> None:
        """The sums and histograms (what ``merge`` adds) as an .npz, written atomically; the same
        statistics always give the same bytes (no time stamps: ``np.savez`` writes the clock's)."""
        hist = self.histogram.tocsr()
        hist.sort_indices()
        arrays = {"cells": np.int64(self.cells), "expressing": self.expressing, "total": self.total,
                  "total_sq": self.total_sq, "indptr": hist.indptr, "bins": hist.indices, "counts": hist.data}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue(),
                                 zipfile.ZIP_DEFLATED)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> GeneStats:
        try:
            with np.load(path, allow_pickle=False) as f:
                vocab_size = len(f["expressing"])
                return cls(int(f["cells"]), f["expressing"], f["total"], f["total_sq"],
                           sp.csr_matrix((f["counts"], f["bins"], f["indptr"]), shape=(vocab_size, BINS)))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: unreadable gene statistics ({err}); write them again with python -m sharding "
                             "stats") from None


@dataclass(frozen=True)
class GeneSummary:
    """The per-gene statistics a manifest records, as arrays: what training and inference read."""

    cells: int
    expressing: np.ndarray
    mean_nonzero: np.ndarray
    median_nonzero: np.ndarray
    variance: np.ndarray

    @classmethod
    def from_record(cls, record: dict[str, Any], vocab_size: int, where: str) -> GeneSummary:
        try:
            summary = cls(int(record["cells"]), *(np.asarray(record[k], dtype=np.float64) for k in
                                                   ("expressing", "mean_nonzero", "median_nonzero", "variance")))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: corrupt gene_stats in the manifest ({err})") from None
        if any(len(a) != vocab_size for a in (summary.expressing, summary.mean_nonzero, summary.median_nonzero,
                                              summary.variance)):
            raise ValueError(f"{where}: corrupt gene_stats in the manifest (not one entry per gene of the "
                             f"{vocab_size}-gene vocabulary)")
        return summary

    def mean(self) -> np.ndarray:
        """Each gene's mean over all cells, zeros included: what a decoder that knows nothing of the
        cell should predict."""
        return self.mean_nonzero * self.expressing / max(self.cells, 1)


def shard_blocks(paths: Iterable[str], vocab_size: int, cells: int = 2048) -> Iterator[sp.csr_matrix]:
    """The cells of shards ``paths`` as CSR blocks of at most ``cells`` cells (bounded memory: a
    shard is memory-mapped, a block copied out of it)."""
    for path in paths:
        shard = read_shard_arrays(path)
        for start in range(0, len(shard.lengths), cells):
            yield shard.rows(np.arange(start, min(start + cells, len(shard.lengths))), vocab_size)


def compute_gene_stats(directory: str, manifest: dict[str, Any], progress: bool = False) -> GeneStats:
    """One streaming pass over the shards ``manifest`` lists (the cost: reading the set once)."""
    from tqdm.auto import tqdm

    vocab_size = len(manifest["vocabulary"]["feature_id"])
    paths = [os.path.join(directory, s["name"]) for s in manifest["shards"]]
    return GeneStats.over(tqdm(shard_blocks(paths, vocab_size), desc="gene statistics", unit="block",
                               disable=not progress), vocab_size)


def record_gene_stats(directory: str, manifest: dict[str, Any], stats: GeneStats) -> dict[str, Any]:
    """``manifest`` with ``stats`` recorded: the summary in it, the sums in ``STATS_FILE`` beside it
    (written first, so a manifest never names a file that is not there)."""
    path = os.path.join(directory, STATS_FILE)
    stats.save(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return manifest | {"gene_stats": stats.summary() | {"file": STATS_FILE, "sha256": digest}}
