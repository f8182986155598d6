"""Which cells go to which shard: a pure function of the command and the source.

The selected soma_joinids, sorted, cut into runs of ``cells_per_shard``: so a re-run after a kill
recomputes the same plan, and a slice ``I/N`` (one task of a job array) writes a contiguous share
of the plan's shards under their global names, which ``sharding.merge`` joins into the set one
process would write.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scgraph.data.shards.config import parse_slice
from scgraph.data.vocab import GeneMap
from scgraph.io.sources import Source


@dataclass
class ShardJob:
    """One shard to write: everything a worker process needs, as plain data."""

    index: int
    joinids: np.ndarray
    out: str
    obs_columns: list[str]
    gene_map: GeneMap | None  # source genes -> the output vocabulary; None: the source's own genes
    block_cells: int | None  # None: the source's tile extent along cells (DEFAULT_BLOCK_CELLS if none)


@dataclass
class Plan:
    """All selected cells cut into shards; ``slice`` (I/N) picks the shards this run writes. The
    digest covers every selected cell, so the parts of one job array can be checked to agree."""

    joinids: np.ndarray
    cells_per_shard: int
    slice: str | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(self.joinids.astype("<i8").tobytes()).hexdigest()[:16]

    @property
    def n_shards(self) -> int:
        return -(-len(self.joinids) // self.cells_per_shard)

    @property
    def shard_indices(self) -> range:
        """This run's shards: contiguous, so each part reads its cells sequentially, and balanced
        by shard, so parts take equal time."""
        if self.slice is None:
            return range(self.n_shards)
        i, n = parse_slice(self.slice)
        return range(self.n_shards * i // n, self.n_shards * (i + 1) // n)

    def record(self) -> dict[str, Any]:
        """What the manifest says of the plan."""
        out: dict[str, Any] = {"cells": len(self.joinids), "shards": self.n_shards, "joinids_sha256": self.digest}
        if self.slice is not None:
            out["slice"] = self.slice
        return out

    def shard(self, index: int) -> np.ndarray:
        return self.joinids[index * self.cells_per_shard : (index + 1) * self.cells_per_shard]


def select_cells(source: Source, obs_filter: str | None, max_cells: int | None, seed: int) -> np.ndarray:
    """Sorted soma_joinids of the selected cells; reading X in this order keeps reads sequential."""
    try:
        joinids = source.select(obs_filter)
    except Exception as err:  # the SOMA/pandas error text is the useful part
        raise ValueError(f"obs filter {obs_filter!r} failed on {source.name}: {err}") from None
    if len(joinids) == 0:
        raise ValueError(f"the query selected no cells (obs filter: {obs_filter!r}); nothing written")
    if max_cells is not None and max_cells < len(joinids):
        keep = np.random.default_rng(seed).choice(len(joinids), size=max_cells, replace=False)
        joinids = joinids[np.sort(keep)]
    return joinids


