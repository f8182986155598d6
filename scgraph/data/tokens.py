"""Token ids: a vocabulary of G genes has ids 0..G-1, then the two special tokens, pad (G) and CLS
(G + 1). The one place that layout is written down: the tokenizer, the masking, the model's
gene-indexed tables and its padding mask all read it from here (no torch, no imports, so the
configs may use it too)."""

from __future__ import annotations

from typing import TypeVar

#: ids after the genes: pad, then CLS
SPECIAL_TOKENS = 2

Ids = TypeVar("Ids")


def pad_id(vocab_size: int) -> int:
    """The id that fills a cell's unused positions."""
    return vocab_size


def cls_id(vocab_size: int) -> int:
    """The id of the CLS token a cell's sequence may start with."""
    return vocab_size + 1


def n_tokens(vocab_size: int) -> int:
    """Rows of every gene-indexed table: the genes, then pad and CLS."""
    return vocab_size + SPECIAL_TOKENS


def is_gene(ids: Ids, vocab_size: int) -> Ids:
    """Where ``ids`` (a numpy array or torch tensor) are genes, not pad or CLS."""
    return ids < vocab_size
