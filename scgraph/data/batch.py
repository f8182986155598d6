"""The unit every training path consumes: tokenized, masked cells as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig
from scgraph.data.masking import mask_values
from scgraph.data.tokenize import tokenize


@dataclass
class Batch:
    genes: torch.Tensor  # (B, L) int64
    values: torch.Tensor  # (B, L) float32, the true values (targets at masked positions)
    masked: torch.Tensor  # (B, L) bool, positions to predict

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.genes.to(device, non_blocking=True),
            self.values.to(device, non_blocking=True),
            self.masked.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return self.genes.shape[0]


def make_batch(
    counts: sp.spmatrix, tok: TokenizerConfig, vocab_size: int, mask_ratio: float, rng: np.random.Generator
) -> Batch:
    """Tokenize and mask a block of cells (rows of ``counts``) with one rng."""
    tokens = tokenize(counts, tok, vocab_size, rng)
    masked = mask_values(tokens.genes, vocab_size, mask_ratio, rng)
    return Batch(torch.from_numpy(tokens.genes), torch.from_numpy(tokens.values), torch.from_numpy(masked))
