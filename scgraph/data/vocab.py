"""The gene vocabulary: feature ids and names in index order, and re-indexing other genes onto it.

A model's gene embeddings are indexed by vocabulary position, so data from a second source (a
labelled .h5ad for the probe, cells written with ``--vocab-from``) must be re-indexed to the
pretraining shard set's vocabulary: ``GeneVocab.map_genes`` is the one place that happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scgraph.config import MATCH_KEYS


@dataclass(frozen=True)
class GeneMap:
    """Where each gene of a source sits in a vocabulary of ``vocab_size`` genes (-1: absent)."""

    positions: np.ndarray
    vocab_size: int

    @property
    def matched(self) -> int:
        return int((self.positions >= 0).sum())

    @property
    def dropped(self) -> int:
        return int((self.positions < 0).sum())

    def apply(self, counts: sp.spmatrix) -> sp.csr_matrix:
        """``counts`` (cells x source genes) as cells x vocabulary: genes the vocabulary lacks are
        dropped, source genes that land on one vocabulary gene are summed; canonical CSR (sorted,
        no explicit zeros)."""
        keep = np.flatnonzero(self.positions >= 0)
        projection = sp.csr_matrix((np.ones(len(keep), dtype=counts.dtype), (keep, self.positions[keep])),
                                   shape=(counts.shape[1], self.vocab_size))
        out = sp.csr_matrix(counts @ projection)
        out.sum_duplicates()
        out.eliminate_zeros()
        out.sort_indices()
        return out


@dataclass
class GeneVocab:
    feature_ids: list[str]
    feature_names: list[str]
    _positions: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.feature_ids) != len(self.feature_names):
            raise ValueError(
                f"vocabulary has {len(self.feature_ids)} feature ids but "
                f"{len(self.feature_names)} feature names"
            )
        if len(set(self.feature_ids)) != len(self.feature_ids):
            seen: set[str] = set()
            repeated = next(g for g in self.feature_ids if g in seen or seen.add(g))
            raise ValueError(f"gene feature ids must be unique; {repeated!r} appears "
                             f"{self.feature_ids.count(repeated)} times")

    def __len__(self) -> int:
        return len(self.feature_ids)

    def keys(self, by: str) -> list[str]:
        """The vocabulary's genes as matched ``by`` feature_id or feature_name."""
        if by not in MATCH_KEYS:
            raise ValueError(f"genes match by one of {', '.join(MATCH_KEYS)}; got {by!r}")
        return self.feature_ids if by == "feature_id" else self.feature_names

    def _index(self, by: str) -> dict[str, int]:
        if by not in self._positions:
            index: dict[str, int] = {}
            for i, key in enumerate(self.keys(by)):
                index.setdefault(key, i)  # a repeated name maps to its first gene
            self._positions[by] = index
        return self._positions[by]

    def positions(self, genes: Sequence[str], by: str = "feature_id") -> np.ndarray:
        """Vocabulary index of each gene, -1 where the gene is not in the vocabulary."""
        index = self._index(by)
        return np.fromiter((index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))

    def map_genes(self, genes: Sequence[str], by: str = "feature_id") -> GeneMap:
        """How a source whose genes are ``genes`` (its var, in column order) re-indexes onto this
        vocabulary; genes the vocabulary lacks have no embedding and are dropped (and counted)."""
        return GeneMap(self.positions(genes, by), len(self))
