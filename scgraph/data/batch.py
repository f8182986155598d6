"""The unit every training path consumes: tokenized, masked cells as tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig
from scgraph.data.masking import mask_values
from scgraph.data.tokenize import GeneChoice, profile, tokenize


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

    def pin_memory(self) -> Batch:
        """In page-locked memory, so ``to`` a CUDA device can copy without blocking (what a
        DataLoader with ``pin_memory`` calls on each batch)."""
        return self._map(torch.Tensor.pin_memory)

    def __len__(self) -> int:
        return self.genes.shape[0]

    def __getitem__(self, cells: slice) -> Batch:
        """These cells (rows) of the batch."""
        return Batch(*(None if t is None else t[cells] for t in dataclasses.astuple(self)))


def make_batch(
    counts: sp.spmatrix, tok: TokenizerConfig, vocab_size: int, mask_ratio: float, rng: np.random.Generator,
    recon_genes: int | None = None, choice: GeneChoice | None = None,
) -> Batch:
    """Tokenize (with the corpus's ``choice``, see ``tokenize``) and mask a block of cells (rows of
    ``counts``) with one rng; with ``recon_genes``, also the profile the recon objective scores
    (that many unexpressed genes per cell)."""
    tokens = tokenize(counts, tok, vocab_size, rng, choice)
    masked = mask_values(tokens.genes, vocab_size, mask_ratio, rng)
    batch = Batch(torch.from_numpy(tokens.genes), torch.from_numpy(tokens.values), torch.from_numpy(masked))
    if recon_genes is not None:
        p = profile(counts, tok, vocab_size, recon_genes, rng)
        batch.profile_genes, batch.profile_values = torch.from_numpy(p.genes), torch.from_numpy(p.values)
        batch.profile_weight = torch.from_numpy(p.weight)
    return batch
