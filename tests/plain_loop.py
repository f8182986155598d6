"""A single-process training loop for tests (the library's one trainer is the DeepSpeed one):
AdamW on the MVP loss over given batches, and an in-memory batch iterator."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig, TrainConfig
from scgraph.data.batch import Batch, make_batch
from scgraph.models.model import CellModel, mvp_loss


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    cells: int = 0
    seconds: float = 0.0

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds if self.seconds else 0.0

    def mean_loss(self, last: int) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def train_plain(model: CellModel, batches: Iterable[Batch], cfg: TrainConfig) -> History:
    """AdamW on the MVP loss for ``cfg.max_steps`` steps; stops early if ``batches`` runs out."""
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = History()
    start = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        loss = mvp_loss(model(batch.genes, batch.values, batch.masked), batch.values, batch.masked)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"MVP loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history.losses.append(loss.item())
        history.cells += len(batch)
        if step >= cfg.max_steps:
            break
    history.seconds = time.perf_counter() - start
    return history


def iterate_batches(counts: sp.spmatrix, tok: TokenizerConfig, vocab_size: int, batch_size: int,
                    mask_ratio: float, seed: int) -> Iterator[Batch]:
    """Endless, reproducible shuffled epochs over an in-memory matrix."""
    counts = sp.csr_matrix(counts)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(counts.shape[0])
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield make_batch(counts[order[start : start + batch_size]], tok, vocab_size, mask_ratio, rng)
