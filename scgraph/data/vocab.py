"""The gene vocabulary: feature ids and names in index order, and mapping other genes onto it.

A model's gene embeddings are indexed by vocabulary position, so data from a second source (a
labelled .h5ad for the probe, say) must be written in the pretraining shard set's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MATCH_KEYS = ("feature_id", "feature_name")


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
            raise ValueError("vocabulary feature ids must be unique")

    def __len__(self) -> int:
        return len(self.feature_ids)

    def _index(self, by: str) -> dict[str, int]:
        if by not in MATCH_KEYS:
            raise ValueError(f"genes match by one of {', '.join(MATCH_KEYS)}; got {by!r}")
        if by not in self._positions:
            keys = self.feature_ids if by == "feature_id" else self.feature_names
            index: dict[str, int] = {}
            for i, key in enumerate(keys):
                index.setdefault(key, i)  # a repeated name maps to its first gene
            self._positions[by] = index
        return self._positions[by]

    def positions(self, genes: Sequence[str], by: str = "feature_id") -> np.ndarray:
        """Vocabulary index of each gene, -1 where the gene is not in the vocabulary."""
        index = self._index(by)
        return np.fromiter((index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))

    def lookup(self, genes: Sequence[str], by: str = "feature_id") -> np.ndarray:
        """Like ``positions`` but every gene must be known: names the first few that are not."""
        pos = self.positions(genes, by)
        if (pos < 0).any():
            missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"gene(s) not in the vocabulary ({by}): {', '.join(missing[:5])}{more}")
        return pos

    def digest(self) -> str:
        """Stable hash of the vocabulary, so two shard sets can be checked for compatibility."""
        blob = json.dumps([self.feature_ids, self.feature_names]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
