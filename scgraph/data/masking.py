"""Masked value prediction: choose which values of each cell the model must predict."""

from __future__ import annotations

import numpy as np

from scgraph.data.tokens import is_gene


def mask_values(genes: np.ndarray, vocab_size: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(n, L) bool: ``round(ratio * n_genes)`` positions per cell, at least one when the cell has a
    gene, chosen uniformly among its genes (never pad or CLS)."""
    genes_here = is_gene(genes, vocab_size)
    n_genes = genes_here.sum(axis=1)
    n_mask = np.where(n_genes > 0, np.maximum(1, np.rint(ratio * n_genes)), 0).astype(np.int64)
    key = np.where(genes_here, rng.random(genes.shape), np.inf)
    # the n_mask smallest keys of each row: at or below the row's n_mask-th smallest key
    threshold = np.take_along_axis(np.sort(key, axis=1), np.maximum(n_mask - 1, 0)[:, None], axis=1)
    return (key <= threshold) & (n_mask > 0)[:, None]
