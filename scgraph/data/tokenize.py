"""Raw counts -> fixed-length (gene ids, values) tokens, vectorised over a batch of cells.

Tokenization happens at load time so one shard set serves every model setting. A batch is a CSR
matrix (cells x genes); the gene selection is done for all cells at once on a (cells x longest
cell) key matrix: a partition keeps each cell's L best, so only L keys per cell are sorted (at the
census's ~2,000 genes per cell, 3-6x faster than one lexsort of every non-zero, and the same
tokens). The module is over 300 lines because selection, profiles and the corpus's gene choice
share these helpers.
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


def _values(matrix: sp.csr_matrix, cfg: TokenizerConfig, take: np.ndarray | None = None,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Per-non-zero model input values: log1p after library-size normalisation (over ALL the
    cell's genes), or the raw values; with ``take`` (positions into ``matrix.data``, in rows
    ``rows``) only those: a cell longer than L needs L of its ~2,000."""
    if cfg.normalization == "none":
        return (matrix.data if take is None else matrix.data[take]).astype(np.float32)
    return log1p_normalized(matrix, cfg.target_sum, take, rows)


def _dense(flat: np.ndarray, counts: np.ndarray, fill: float | int) -> np.ndarray:
    """(rows, longest) the row-wise runs of ``flat`` (``counts[i]`` values for row i, in order),
    left-aligned, ``fill`` after them."""
    out = np.full((counts.size, int(counts.max(initial=0))), fill, dtype=flat.dtype)
    out[np.arange(out.shape[1], dtype=counts.dtype) < counts[:, None]] = flat  # counts' type: a 6x faster compare
    return out


def _smallest(key: np.ndarray, length: int) -> np.ndarray:
    """(m, min(length, w)) the columns of each row's ``length`` smallest keys of ``key`` (m, w),
    ascending, ties by column (pads must be +inf): what a stable sort of each row keeps. A row much
    longer than ``length`` is partitioned first, so only ``length`` keys are sorted."""
    m, w = key.shape
    cols = None
    if w > 2 * length:
        threshold = np.partition(key, length - 1, axis=1)[:, length - 1:length]
        sel, tie = key < threshold, key == threshold
        need = length - sel.sum(axis=1)
        excess = tie.sum(axis=1) > need
        if excess.any():  # more keys equal the threshold than places left: the first columns win
            tie[excess] &= np.cumsum(tie[excess], axis=1) <= need[excess, None]
        sel |= tie
        cols = np.flatnonzero(sel).reshape(m, length) - (np.arange(m) * w)[:, None]
        key = key[sel].reshape(m, length)
    order = np.argsort(key, axis=1)
    ranked = np.take_along_axis(key, order[:, :length + 1], axis=1)  # the kept, and the first left out
    if ((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] != np.inf)).any():
        order = np.argsort(key, axis=1, kind="stable")  # ties: the unstable sort's order is arbitrary
    order = order[:, :length]
    return order if cols is None else np.take_along_axis(cols, order, axis=1)


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


def token_counts(matrix: sp.csr_matrix, cfg: TokenizerConfig, choice: GeneChoice | None) -> np.ndarray:
    """(cells,) how many genes each row of ``matrix`` (stored non-zeros) shows the encoder before
    gene dropout: its expressed genes, only the variable ones under ``hvg_genes``, at most L."""
    if choice is not None and choice.allowed is not None:
        counts = np.diff(np.concatenate(([0], np.cumsum(choice.allowed[matrix.indices])))[matrix.indptr])
    else:
        counts = np.diff(matrix.indptr)
    return np.minimum(counts, cfg.seq_len)


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
    only the corpus's most variable genes are candidates, and with ``cfg.gene_dropout`` p each
    candidate of a cell with more than L is hidden with probability p first (seeded by ``rng``).
    ``choice`` carries what the corpus statistics say (see :class:`GeneChoice`).

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
    n, length = matrix.shape[0], cfg.seq_len
    indices, indptr, src = matrix.indices, matrix.indptr, None
    if choice is not None and choice.allowed is not None:  # only the variable genes are candidates
        indices, indptr, src = _candidates(choice.allowed[indices], indices, indptr, src)
    if cfg.gene_dropout:  # hide genes of the cells that have more candidates than L
        if rng is None:
            raise ValueError("gene dropout needs an rng (numpy Generator) for reproducibility")
        counts = np.diff(indptr)
        hidden = rng.random(indices.size) < cfg.gene_dropout
        indices, indptr, src = _candidates(~(hidden & np.repeat(counts > length, counts)), indices, indptr, src)
    counts = np.diff(indptr)
    n_genes = np.minimum(counts, length)
    values = None  # of every candidate, where the selection needs them
    if cfg.selection in ("top", "rank"):  # highest key first, ties by gene id (= by column: indices are sorted)
        if cfg.selection == "top":
            values = _values(matrix, cfg)
            values = values if src is None else values[src]
            key = -values
        else:
            raw = matrix.data if src is None else matrix.data[src]
            key = -(raw / choice.median[indices])
        cols = _smallest(_dense(key, counts, np.inf), length)
    else:
        if rng is None:
            raise ValueError(f"{cfg.selection} gene selection needs an rng (numpy Generator) for reproducibility")
        cols = np.tile(np.arange(n_genes.max(initial=0)), (n, 1))  # stored order, unless longer than L
        over = np.flatnonzero(counts > length)  # only cells with more genes than L need a random subset
        if over.size:
            key = rng.random(int(counts[over].sum()))  # one draw per gene of those cells, in stored order
            if cfg.selection == "weighted":
                # Efraimidis-Spirakis: the smallest Exp(1) / value first is a draw without replacement
                # with probability proportional to the value; e / (1 + e) keeps the order inside [0, 1).
                at = _runs(indptr[over], counts[over])
                value = _values(matrix, cfg, _source(at, src), np.repeat(over, counts[over]))
                e = -np.log1p(-key) / np.maximum(value, 1e-12)
                key = e / (1.0 + e)
                cols[over] = _smallest(_dense(key, counts[over], np.inf), length)
            else:
                cols[over] = _uniform_smallest(key, counts[over], length)
    take = indptr[:-1, None] + cols  # (n, longest selection) positions of the chosen genes
    chosen = np.arange(cols.shape[1], dtype=n_genes.dtype) < n_genes[:, None]
    kept_rows, take = np.nonzero(chosen)[0], take[chosen]
    offset = int(bool(cfg.cls_token))
    width = cols.shape[1] + offset
    genes = np.full((n, width), pad_id(vocab_size), dtype=np.int64)
    vals = np.zeros((n, width), dtype=np.float32)
    genes[:, offset:][chosen] = indices[take]
    vals[:, offset:][chosen] = values[take] if values is not None else \
        _values(matrix, cfg, _source(take, src), kept_rows)
    if cfg.n_bins is not None:
        vals[:, offset:] = bin_values(vals[:, offset:], n_genes, cfg.n_bins)
    if cfg.cls_token:
        genes[:, 0] = cls_id(vocab_size)
    return Tokens(genes=genes, values=vals, n_genes=n_genes)


def _candidates(keep: np.ndarray, indices: np.ndarray, indptr: np.ndarray, src: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, indptr, src) of the candidates ``keep`` leaves; ``src`` maps a candidate to its
    position in the matrix's ``data`` (None: the identity)."""
    at = np.flatnonzero(keep)
    return indices[at], np.concatenate(([0], np.cumsum(keep)))[indptr], at if src is None else src[at]


def _uniform_smallest(key: np.ndarray, counts: np.ndarray, length: int) -> np.ndarray:
    """:func:`_smallest` of rows of uniform [0, 1) keys given as runs (``counts[i]`` keys for row i,
    all longer than ``length``): only keys below (length + 8 sqrt(length) + 8) / count, where a
    row's ``length`` smallest lie but for a chance of about 1e-12 (a row with too few keeps all)
    are candidates, so a ~2,000-gene row is narrowed to ~700 before the sort."""
    ends = np.cumsum(counts)
    starts = ends - counts
    below = key < np.repeat((length + 8 * np.sqrt(length) + 8) / counts, counts)
    at = np.flatnonzero(below)
    n_below = np.diff(np.searchsorted(at, np.concatenate(([0], ends))))
    short = n_below < length
    if short.any():
        at = np.flatnonzero(below | np.repeat(short, counts))
        n_below = np.where(short, counts, n_below)
    first = np.cumsum(n_below) - n_below
    chosen = _smallest(_dense(key[at], n_below, np.inf), length)
    return at[first[:, None] + chosen] - starts[:, None]


def _runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[0], starts[0] + 1, ..., starts[0] + counts[0] - 1, starts[1], ...: the positions of
    the rows whose entries start at ``starts``."""
    return np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts), counts)


def _source(positions: np.ndarray, src: np.ndarray | None) -> np.ndarray:
    """Candidate positions -> positions in the matrix's data (``src``: the candidates', None: all)."""
    return positions if src is None else src[positions]


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
    longest = int(counts.max(initial=0))
    column = np.arange(longest + unexpressed, dtype=counts.dtype)  # counts' type: a 6x faster compare
    expressed = column < counts[:, None]  # each row: its genes, then the draws
    drawn_at = (column >= counts[:, None]) & (column < counts[:, None] + unexpressed)
    genes = np.full(expressed.shape, pad_id(vocab_size), dtype=np.int64)
    vals = np.zeros(expressed.shape, dtype=np.float32)
    weight = np.zeros(expressed.shape, dtype=np.float32)
    genes[expressed], vals[expressed], weight[expressed] = matrix.indices, values, 1.0
    # draws that hit an expressed gene are dropped (rejection)
    drawn = rng.integers(0, vocab_size, (n, unexpressed))
    hit = _expresses(genes[:, :longest], drawn, vocab_size)
    kept = (~hit).sum(axis=1, keepdims=True)
    genes[drawn_at] = np.where(hit, pad_id(vocab_size), drawn).ravel()
    weight[drawn_at] = np.where(hit, 0.0, (vocab_size - counts[:, None]) / np.maximum(kept, 1)).ravel()
    return Profile(genes, vals, weight)


def _expresses(genes: np.ndarray, drawn: np.ndarray, vocab_size: int) -> np.ndarray:
    """(n, k) whether row i of ``genes`` (n, w), ids with pads = vocab_size, holds ``drawn[i, j]``:
    a membership bitmap of about 1 MB (a few cells x the vocabulary) reused cell block by cell
    block, set and cleared at the cell's genes: no sort, no search, no cells x vocabulary array."""
    width = vocab_size + 1  # the pad's column too
    block = max(1, (1 << 20) // width)
    bitmap = np.zeros(block * width, dtype=bool)
    hit = np.empty(drawn.shape, dtype=bool)
    for start in range(0, genes.shape[0], block):
        base = (np.arange(min(block, genes.shape[0] - start)) * width)[:, None]
        at = base + genes[start:start + block]
        bitmap[at] = True
        hit[start:start + block] = bitmap[base + drawn[start:start + block]]
        bitmap[at] = False
    return hit


def mean_profile(matrix: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int) -> np.ndarray:
    """(vocab_size,) each gene's mean normalised value over the cells of ``matrix``, zeros included:
    what a decoder that knows nothing of the cell should predict."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    totals = np.bincount(matrix.indices, weights=_values(matrix, cfg), minlength=vocab_size)
    return (totals / max(matrix.shape[0], 1)).astype(np.float32)
