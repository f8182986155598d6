"""Masked value prediction: choose which values of each cell the model must predict."""

from __future__ import annotations

import torch

from scgraph.data.tokens import is_gene


def mask_values(genes: torch.Tensor, vocab_size: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n, L) bool on ``genes``' device: ``round(ratio * n_genes)`` positions per cell (half to
    even), at least one when the cell has a gene, chosen uniformly among its genes (never pad or
    CLS): the positions of each row's smallest draws, exactly that many (ranked, so ties cannot
    add one)."""
    here = is_gene(genes, vocab_size)
    n_genes = here.sum(dim=1)
    n_mask = torch.where(n_genes > 0, torch.round(n_genes.double() * ratio).clamp(min=1), 0.0).long()
    draws = torch.rand(genes.shape, dtype=torch.float64, device=genes.device, generator=generator)
    order = torch.where(here, draws, torch.inf).argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(genes.shape[1], device=genes.device)
                                            .expand_as(order).contiguous())
    return rank < n_mask[:, None]
