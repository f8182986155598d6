"""The unit every training path consumes: tokenized, masked cells as tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig
from scgraph.data.masking import mask_values
from scgraph.data.tokenize import profile, tokenize


@dataclass
class Batch:
    genes: torch.Tensor  # (B, L) int64
    values: torch.Tensor  # (B, L) float32, the true values (targets at masked positions)
    masked: torch.Tensor  # (B, L) bool, positions to predict
    # what the recon objective scores (B, S): gene ids, their values, their weights; None without it
    profile_genes: torch.Tensor | None = None
    profile_values: torch.Tensor | None = None
    profile_weight: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))

    def __len__(self) -> int:
        return self.genes.shape[0]

    def __getitem__(self, cells: slice) -> Batch:
        """These cells (rows) of the batch."""
        return Batch(*(None if t is None else t[cells] for t in dataclasses.astuple(self)))


def make_batch(
    counts: sp.spmatrix, tok: TokenizerConfig, vocab_size: int, mask_ratio: float, rng: np.random.Generator,
    recon_genes: int | None = None,
) -> Batch:
    """Tokenize and mask a block of cells (rows of ``counts``) with one rng; with ``recon_genes``,
    also the profile the recon objective scores (that many unexpressed genes per cell)."""
    tokens = tokenize(counts, tok, vocab_size, rng)
    masked = mask_values(tokens.genes, vocab_size, mask_ratio, rng)
    batch = Batch(torch.from_numpy(tokens.genes), torch.from_numpy(tokens.values), torch.from_numpy(masked))
    if recon_genes is not None:
        p = profile(counts, tok, vocab_size, recon_genes, rng)
        batch.profile_genes, batch.profile_values = torch.from_numpy(p.genes), torch.from_numpy(p.values)
        batch.profile_weight = torch.from_numpy(p.weight)
    return batch
