"""Raw counts -> fixed-length (gene ids, values) tokens, vectorised over a batch of cells.

Tokenization happens at load time so one shard set serves every model setting. A batch is a CSR
matrix (cells x genes); the gene selection is done for all cells at once with one lexsort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scgraph.config import TokenizerConfig
from scgraph.data.shards.stats import GeneSummary
from scgraph.data.tokens import cls_id, pad_id
from scgraph.io.counts import check_counts, log1p_normalized


@dataclass
class Tokens:
    """``genes`` (n, length) int64 ids (pad and CLS as ``scgraph.data.tokens`` numbers them); ``values``
    (n, length) float32, 0 at pad and CLS; ``n_genes`` (n,) genes kept per cell. ``length`` is the
    longest cell's (at most seq_len, plus the CLS)."""

    genes: np.ndarray
    values: np.ndarray
    n_genes: np.ndarray


def _values(matrix: sp.csr_matrix, cfg: TokenizerConfig) -> np.ndarray:
    """Per-non-zero model input values: log1p after library-size normalisation (over ALL the
    cell's genes), or the raw values."""
    if cfg.normalization == "none":
        return matrix.data.astype(np.float32)
    return log1p_normalized(matrix, cfg.target_sum)


def bin_values(values: np.ndarray, n_genes: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT-style per-cell binning: each cell's non-zero values go to bins 1..n_bins-1 by the
    cell's own quantiles, so values compare across sequencing depths. ``values`` is (n, L) with the
    first ``n_genes[i]`` entries of row i real; the rest stay 0."""
    out = np.zeros_like(values)
    edges_q = np.linspace(0.0, 1.0, n_bins)
    for i, k in enumerate(n_genes):
        if k == 0:
            continue
        row = values[i, :k]
        edges = np.quantile(row, edges_q)
        out[i, :k] = np.clip(np.digitize(row, edges[1:-1], right=True) + 1, 1, n_bins - 1)
    return out


@dataclass(frozen=True)
class GeneChoice:
    """What token selection knows of the corpus, from its per-gene statistics: ``median`` (G,) each
    gene's median non-zero value as counts per 10,000 (the divisor of the ``rank`` selection;
    None when not used), ``allowed`` (G,) the genes a cell may show (the ``hvg_genes`` most variable;
    None: every gene). A checkpoint records it, so inference selects as training did."""

    median: np.ndarray | None = None
    allowed: np.ndarray | None = None

    @classmethod
    def build(cls, tok: TokenizerConfig, stats: GeneSummary | None, where: str) -> GeneChoice | None:
        """The choice ``tok`` asks for, from ``stats``; the medians whenever there are statistics
        (so inference can rank by them whatever training did); None without statistics."""
        if stats is None:
            if needs_gene_stats(tok):
                raise ValueError(f"{where}: {_needs(tok)} needs per-gene statistics of the training corpus (python "
                                 f"-m sharding stats {where} adds them to the shard set)")
            return None
        vocab_size = len(stats.variance)
        median = np.expm1(stats.median_nonzero)
        expressed = median > 0
        # a gene the corpus never expressed: ranked as a typical gene would be
        median = np.where(expressed, median, np.median(median[expressed]) if expressed.any() else 1.0)
        allowed = None
        if tok.hvg_genes is not None:
            if tok.hvg_genes > vocab_size:
                raise ValueError(f"hvg_genes ({tok.hvg_genes}) is larger than the vocabulary ({vocab_size} genes)")
            allowed = np.zeros(vocab_size, dtype=bool)
            allowed[np.argsort(-stats.variance, kind="stable")[: tok.hvg_genes]] = True
        return cls(median, allowed)

    def to_record(self) -> dict[str, Any]:
        """JSON for a checkpoint's record."""
        return {"median": None if self.median is None else self.median.tolist(),
                "allowed": None if self.allowed is None else np.flatnonzero(self.allowed).tolist()}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None, vocab_size: int) -> GeneChoice | None:
        if record is None:
            return None
        allowed = None
        if record.get("allowed") is not None:
            allowed = np.zeros(vocab_size, dtype=bool)
            allowed[np.asarray(record["allowed"], dtype=np.int64)] = True
        median = None if record.get("median") is None else np.asarray(record["median"], dtype=np.float64)
        return cls(median, allowed)


def needs_gene_stats(tok: TokenizerConfig) -> bool:
    """Whether the selection reads the corpus's per-gene statistics."""
    return tok.selection == "rank" or tok.hvg_genes is not None


def _needs(tok: TokenizerConfig) -> str:
    return " and ".join(x for x in ("selection 'rank'" if tok.selection == "rank" else "",
                                    f"hvg_genes {tok.hvg_genes}" if tok.hvg_genes is not None else "") if x)


def tokenize(
    matrix: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int, rng: np.random.Generator | None = None,
    choice: GeneChoice | None = None,
) -> Tokens:
    """Tokenize every cell (row) of ``matrix``: select up to ``seq_len`` non-zero genes, pad,
    optionally prepend CLS. Selection (``cfg.selection``): ``random`` (seeded by ``rng``), ``top``
    by expression (ties by gene id), ``weighted`` (random, proportional to the value) or ``rank``
    (top by the value divided by the gene's median over the corpus, Geneformer's normalised rank:
    a gene every cell expresses highly no longer crowds out a rare marker); with ``cfg.hvg_genes``
    only the corpus's most variable genes are candidates. ``choice`` carries what the corpus
    statistics say (see :class:`GeneChoice`).

    The batch is as long as its longest cell's selection (at most ``seq_len``): padding a batch of
    short cells to a long L would only waste the step. Values are normalised over ALL the cell's
    genes, candidates or not; binning is computed over the selected genes. Deterministic for a
    given ``rng`` state.
    """
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    if matrix.shape[1] > vocab_size:
        raise ValueError(f"counts have {matrix.shape[1]} gene columns but the vocabulary has {vocab_size}")
    check_counts(matrix, integers=False)
    if (cfg.selection == "rank" and (choice is None or choice.median is None)) or \
            (cfg.hvg_genes is not None and (choice is None or choice.allowed is None)):
        raise ValueError(f"{_needs(cfg)} needs the training corpus's gene statistics, which this model or data "
                         "does not carry (pretrain on a shard set with them: python -m sharding stats DIR)")
    n = matrix.shape[0]
    values = _values(matrix, cfg)
    raw, indices, indptr = matrix.data, matrix.indices, matrix.indptr
    if choice is not None and choice.allowed is not None:  # only the variable genes are candidates
        keep_nz = choice.allowed[indices]
        kept = np.bincount(np.repeat(np.arange(n), np.diff(indptr))[keep_nz], minlength=n)
        raw, indices, values = raw[keep_nz], indices[keep_nz], values[keep_nz]
        indptr = np.concatenate(([0], np.cumsum(kept)))
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(n), counts)
    if cfg.selection in ("top", "rank"):  # highest key first, ties by gene id
        key = values if cfg.selection == "top" else raw / choice.median[indices]
        order = np.lexsort((indices, -key, rows))
    else:
        if rng is None:
            raise ValueError(f"{cfg.selection} gene selection needs an rng (numpy Generator) for reproducibility")
        # Only cells with more genes than seq_len need a random subset: shuffle within just those
        # rows (row + a key in [0, 1) keeps each row's block in place), and leave the rest in stored order.
        order = np.arange(values.size)
        over = np.flatnonzero(np.repeat(counts > cfg.seq_len, counts))
        if over.size:
            key = rng.random(over.size)
            if cfg.selection == "weighted":
                # Efraimidis-Spirakis: the smallest Exp(1) / value first is a draw without replacement
                # with probability proportional to the value; e / (1 + e) keeps the order inside [0, 1).
                e = -np.log1p(-key) / np.maximum(values[over], 1e-12)
                key = e / (1.0 + e)
            # keys are distinct (almost surely), so the unstable sort gives the same order, 1.6x faster
            order[over] = over[np.argsort(rows[over] + key)]
    rank = np.arange(values.size) - indptr[rows[order]]
    keep = order[rank < cfg.seq_len]
    kept_rows, slot = rows[keep], rank[rank < cfg.seq_len]

    n_genes = np.minimum(counts, cfg.seq_len)
    offset = int(bool(cfg.cls_token))
    width = int(n_genes.max(initial=0)) + offset
    genes = np.full((n, width), pad_id(vocab_size), dtype=np.int64)
    vals = np.zeros((n, width), dtype=np.float32)
    genes[kept_rows, slot + offset] = indices[keep]
    vals[kept_rows, slot + offset] = values[keep]
    if cfg.n_bins is not None:
        vals[:, offset:] = bin_values(vals[:, offset:], n_genes, cfg.n_bins)
    if cfg.cls_token:
        genes[:, 0] = cls_id(vocab_size)
    return Tokens(genes=genes, values=vals, n_genes=n_genes)


@dataclass
class Profile:
    """What the ``recon`` objective scores per cell: ``genes`` (n, S) ids (padded),
    ``values`` (n, S) the normalised expression (0 for an unexpressed gene), ``weight`` (n, S) how
    much each entry counts (0 at pad). Summed ``weight * error**2`` over ``weight.sum()`` estimates
    the mean squared error over the whole vocabulary without bias."""

    genes: np.ndarray
    values: np.ndarray
    weight: np.ndarray


def profile(matrix: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int, unexpressed: int,
            rng: np.random.Generator) -> Profile:
    """Each cell's expressed genes with their values (normalised as the model's input, never binned)
    plus ``unexpressed`` genes drawn uniformly from those it does not express, weighted
    (vocabulary - expressed) / kept draws so zeros count as much as in the full profile. When the
    vocabulary is no larger than that, every gene is scored with weight 1 (the exact full profile)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    n = matrix.shape[0]
    values = _values(matrix, cfg)
    counts = np.diff(matrix.indptr)
    if counts.max(initial=0) + unexpressed >= vocab_size:
        dense = sp.csr_matrix((values, matrix.indices, matrix.indptr), shape=(n, vocab_size)).toarray()
        genes = np.broadcast_to(np.arange(vocab_size), (n, vocab_size)).copy()
        return Profile(genes, dense.astype(np.float32), np.ones((n, vocab_size), dtype=np.float32))
    width = counts.max(initial=0) + unexpressed
    genes = np.full((n, width), pad_id(vocab_size), dtype=np.int64)
    vals = np.zeros((n, width), dtype=np.float32)
    weight = np.zeros((n, width), dtype=np.float32)
    rows = np.repeat(np.arange(n), counts)
    slot = np.arange(values.size) - matrix.indptr[rows]
    genes[rows, slot], vals[rows, slot], weight[rows, slot] = matrix.indices, values, 1.0
    # draws that hit an expressed gene are dropped (rejection): keys row * V + gene are sorted
    drawn = rng.integers(0, vocab_size, (n, unexpressed))
    keys = rows.astype(np.int64) * vocab_size + matrix.indices
    drawn_keys = np.arange(n)[:, None] * vocab_size + drawn
    hit = keys[np.minimum(np.searchsorted(keys, drawn_keys), max(keys.size - 1, 0))] == drawn_keys if keys.size else \
        np.zeros_like(drawn, dtype=bool)
    kept = (~hit).sum(axis=1, keepdims=True)
    at = counts[:, None] + np.arange(unexpressed)
    genes[np.arange(n)[:, None], at] = np.where(hit, pad_id(vocab_size), drawn)
    weight[np.arange(n)[:, None], at] = np.where(hit, 0.0, (vocab_size - counts[:, None]) / np.maximum(kept, 1))
    return Profile(genes, vals, weight)


def mean_profile(matrix: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int) -> np.ndarray:
    """(vocab_size,) each gene's mean normalised value over the cells of ``matrix``, zeros included:
    what a decoder that knows nothing of the cell should predict."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    totals = np.bincount(matrix.indices, weights=_values(matrix, cfg), minlength=vocab_size)
    return (totals / max(matrix.shape[0], 1)).astype(np.float32)
