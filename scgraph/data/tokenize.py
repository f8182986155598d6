"""Raw counts -> tokenized, masked ``Batch``es: batched torch ops on a ``SparseBatch``, on its device.

The loader hands over cells as CSR tensors (``SparseBatch``); ``build_batch`` turns them into what
the model consumes where the model runs (the GPU there, the CPU here). Everything is batched over
the cells of a (cells x longest cell) layout: each row holds a cell's stored genes, left-aligned,
padded with the pad id. Nothing is ever (cells x vocabulary): the census vocabulary is 60,664
genes, a cell about 2,000.

    normalise (log1p of counts per ``target_sum``, over ALL the cell's genes) -> candidates (the
    ``hvg_genes`` restriction, then gene dropout) -> selection key per candidate -> one stable sort
    per row (ties by gene id: ids are sorted in a row) -> the first L -> binning -> CLS
    -> masks -> the recon profile

Every draw comes from one ``torch.Generator`` on the batch's device seeded by the batch's key, in
a fixed order (dropout, selection, masks, profile), so a batch is the same for its key on a given
device (resume relies on it). ``token_counts`` (the loader's length key, numpy on the CSR it holds)
and ``GeneChoice`` (what the corpus statistics say) stay on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig
from scgraph.data.batch import Batch, SparseBatch
from scgraph.data.masking import mask_values
from scgraph.data.shards.stats import GeneSummary
from scgraph.data.tokens import cls_id, pad_id
from scgraph.io.counts import log1p_normalized


@dataclass(frozen=True)
class GeneChoice:
    """What token selection knows of the corpus, from its per-gene statistics: ``median`` (G,) each
    gene's median non-zero value as counts per 10,000 (the divisor of the ``rank`` selection;
    None when not used), ``allowed`` (G,) the genes a cell may show (the ``hvg_genes`` most variable;
    None: every gene). A checkpoint records it, so inference selects as training did."""

    median: np.ndarray | None = None
    allowed: np.ndarray | None = None
    _on: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(median, allowed) as tensors on ``device`` indexed by token id (pad and CLS: median 1,
        not allowed), so a padded row of ids indexes them directly; copied once per device."""
        if device not in self._on:
            median = allowed = None
            if self.median is not None:
                median = torch.from_numpy(np.concatenate((self.median, [1.0, 1.0]))).to(device)
            if self.allowed is not None:
                allowed = torch.from_numpy(np.concatenate((self.allowed, [False, False]))).to(device)
            self._on[device] = (median, allowed)
        return self._on[device]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a spawned DataLoader worker) without the device copies: no CUDA tensor in it."""
        return {**self.__dict__, "_on": {}}

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


def _check_choice(cfg: TokenizerConfig, choice: GeneChoice | None) -> None:
    if (cfg.selection == "rank" and (choice is None or choice.median is None)) or \
            (cfg.hvg_genes is not None and (choice is None or choice.allowed is None)):
        raise ValueError(f"{_needs(cfg)} needs the training corpus's gene statistics, which this model or data "
                         "does not carry (pretrain on a shard set with them: python -m sharding stats DIR)")


@dataclass
class _Cells:
    """A ``SparseBatch`` laid out (cells x longest cell): ``genes`` int64 (pad id after a cell's
    genes, so each row is sorted), ``counts`` float32 (0 at pad), ``stored`` bool (a gene, not
    pad), ``values`` float32 the model input of each gene (0 at pad)."""

    genes: torch.Tensor
    counts: torch.Tensor
    stored: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, batch: SparseBatch, cfg: TokenizerConfig, vocab_size: int) -> _Cells:
        indptr, device = batch.indptr, batch.device
        lengths = indptr[1:] - indptr[:-1]
        column = torch.arange(batch.longest, device=device)
        stored = column < lengths[:, None]
        at = (indptr[:-1, None] + column).clamp_(max=max(batch.genes.shape[0] - 1, 0))
        genes = torch.where(stored, batch.genes[at].long(), pad_id(vocab_size))
        counts = torch.where(stored, batch.counts[at], 0.0)
        return cls(genes, counts, stored, _normalised(counts, cfg))


def _normalised(counts: torch.Tensor, cfg: TokenizerConfig) -> torch.Tensor:
    """Model input values of (cells, w) float32 raw counts (0 at pad): log1p after library-size
    normalisation over ALL the cell's genes, or the raw counts. The same numbers as
    ``io.counts.log1p_normalized`` (which ``mean_profile`` and the statistics use) on float32
    counts: the library size and the scale in float32 (numpy's promotion there), the product and
    log1p in float64. (torch's float64 log1p is 1 ulp off numpy's in about 1 % of values, which
    never changed a float32 result in 2 million tried.)"""
    if cfg.normalization == "none":
        return counts.clone()
    totals = counts.double().sum(dim=1, keepdim=True).float()  # numpy's float32 sum: the same for integer counts
    scale = torch.where(totals > 0, torch.full_like(totals, cfg.target_sum) / totals, 0.0)
    return torch.log1p(scale.double() * counts.double()).float()


@dataclass
class Tokens:
    """``genes`` (n, length) int64 ids (pad and CLS as ``scgraph.data.tokens`` numbers them); ``values``
    (n, length) float32, 0 at pad and CLS; ``n_genes`` (n,) genes kept per cell. ``length`` is the
    longest cell's selection (at most seq_len), plus the CLS."""

    genes: torch.Tensor
    values: torch.Tensor
    n_genes: torch.Tensor


def tokenize(batch: SparseBatch, cfg: TokenizerConfig, vocab_size: int, generator: torch.Generator | None = None,
             choice: GeneChoice | None = None) -> Tokens:
    """Tokenize every cell of ``batch`` on its device: select up to ``seq_len`` of its genes, pad,
    optionally prepend CLS. Selection (``cfg.selection``): ``random`` (a uniform subset of a cell
    longer than L, stored order otherwise), ``top`` by expression (ties by gene id), ``weighted``
    (random, proportional to the value) or ``rank`` (top by the value divided by the gene's median
    over the corpus, Geneformer's normalised rank: a gene every cell expresses highly no longer
    crowds out a rare marker); with ``cfg.hvg_genes`` only the corpus's most variable genes are
    candidates, and with ``cfg.gene_dropout`` p each candidate of a cell with more than L is hidden
    with probability p first. ``choice``: what the corpus statistics say (:class:`GeneChoice`).
    Draws come from ``generator`` (on the batch's device).

    The batch is as long as its longest cell's selection: padding short cells to a long L would
    only waste the step. Values are normalised over ALL the cell's genes, candidates or not;
    binning is computed over the selected genes."""
    with _one_thread_on_cpu(batch.device):
        return _tokenize(_Cells.of(batch, cfg, vocab_size), cfg, vocab_size, generator, choice)


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """On the CPU, build with one intra-op thread: the ops are many and small (a few MB each), so
    a parallel region's fork and join outweigh its work, and on a busy host a region waits for a
    descheduled thread: a 128-cell batch took 180 ms with 2 threads, 3 ms with 1 (2 cores, load 3)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _draws(cells: _Cells, generator: torch.Generator | None, why: str) -> torch.Tensor:
    """(cells, w) uniform [0, 1) float64 draws, one per stored position (pads included, so the
    draws' shape, hence the stream, depends on the batch alone)."""
    if generator is None:
        raise ValueError(f"{why} needs a torch.Generator for reproducibility")
    return torch.rand(cells.genes.shape, dtype=torch.float64, device=cells.genes.device, generator=generator)


def _tokenize(cells: _Cells, cfg: TokenizerConfig, vocab_size: int, generator: torch.Generator | None,
              choice: GeneChoice | None) -> Tokens:
    _check_choice(cfg, choice)
    length, device = cfg.seq_len, cells.genes.device
    median, allowed = choice.on(device) if choice is not None else (None, None)
    candidate = cells.stored
    if cfg.hvg_genes is not None:  # only the variable genes are candidates
        candidate = candidate & allowed[cells.genes]
    if cfg.gene_dropout:  # hide candidates of the cells that have more than L
        hidden = _draws(cells, generator, "gene dropout") < cfg.gene_dropout
        candidate = candidate & ~(hidden & (candidate.sum(dim=1) > length)[:, None])
    n_candidates = candidate.sum(dim=1)
    if cfg.selection == "top":
        key = -cells.values
    elif cfg.selection == "rank":
        key = -(cells.counts.double() / median[cells.genes])
    else:
        key = _draws(cells, generator, f"{cfg.selection} gene selection")
        if cfg.selection == "weighted":
            # Efraimidis-Spirakis: the smallest Exp(1) / value first is a draw without replacement
            # with probability proportional to the value; e / (1 + e) keeps the order inside [0, 1).
            e = -torch.log1p(-key) / cells.values.clamp_min(1e-12).double()
            key = e / (1.0 + e)
        key = torch.where((n_candidates > length)[:, None], key, 0.0)  # a short cell: stored order
    key = torch.where(candidate, key, torch.inf)
    n_genes = n_candidates.clamp(max=length)
    width = int(n_genes.max()) if len(n_genes) else 0  # the one value a GPU reads back: the batch's length
    order = torch.sort(key, dim=1, stable=True).indices[:, :width]  # stable: ties by column = by gene id
    chosen = torch.arange(width, device=device) < n_genes[:, None]
    genes = torch.where(chosen, cells.genes.gather(1, order), pad_id(vocab_size))
    values = torch.where(chosen, cells.values.gather(1, order), 0.0)
    if cfg.n_bins is not None:
        values = bin_values(values, n_genes, cfg.n_bins)
    if cfg.cls_token:
        first = torch.full((genes.shape[0], 1), cls_id(vocab_size), dtype=genes.dtype, device=device)
        genes = torch.cat((first, genes), dim=1)
        values = torch.cat((torch.zeros(first.shape, dtype=values.dtype, device=device), values), dim=1)
    return Tokens(genes, values, n_genes)


def bin_values(values: torch.Tensor, n_genes: torch.Tensor, n_bins: int) -> torch.Tensor:
    """scGPT-style per-cell binning: each cell's values go to bins 1..n_bins-1 by the cell's own
    quantiles, so values compare across sequencing depths. ``values`` is (n, L) with the first
    ``n_genes[i]`` entries of row i real; the rest stay 0. The quantiles are numpy's ``linear``
    ones, computed as numpy does (float32 differences, float64 interpolation), so the bins are
    ``np.digitize(row, np.quantile(row, ...)[1:-1], right=True) + 1``."""
    n, width = values.shape
    real = torch.arange(width, device=values.device) < n_genes[:, None]
    if width == 0:
        return values.clone()
    ranked = torch.sort(torch.where(real, values, torch.inf), dim=1).values
    q = _quantiles(n_bins, values.device)
    last = (n_genes.clamp(min=1) - 1)[:, None]
    at = last.double() * q  # where each quantile lies in the sorted row
    below = at.floor().long()
    top = below >= last
    below = torch.where(top, last, below)
    above = torch.where(top, last, below + 1)
    gamma = at - below.double()
    a, b = ranked.gather(1, below), ranked.gather(1, above)
    step = (b - a).double()  # numpy's lerp: b - a in the values' type, the rest in float64
    edges = torch.where(gamma >= 0.5, b.double() - step * (1 - gamma), a.double() + step * gamma)
    inner = edges[:, 1:-1].contiguous()
    if inner.shape[1]:
        bins = torch.searchsorted(inner, values.double().contiguous(), right=False) + 1  # digitize(right=True)
    else:
        bins = torch.ones_like(values, dtype=torch.long)
    return torch.where(real, bins.clamp(1, n_bins - 1).to(values.dtype), 0.0)


@functools.lru_cache(maxsize=8)
def _quantiles(n_bins: int, device: torch.device) -> torch.Tensor:
    """numpy's ``linspace(0, 1, n_bins)`` (torch's differs in the last bits) on ``device``, copied
    once: a copy from the host per batch would make a GPU wait for its queue."""
    return torch.from_numpy(np.linspace(0.0, 1.0, n_bins)).to(device)


@dataclass
class Profile:
    """What the ``recon`` objective scores per cell: ``genes`` (n, S) ids (padded),
    ``values`` (n, S) the normalised expression (0 for an unexpressed gene), ``weight`` (n, S) how
    much each entry counts (0 at pad). Summed ``weight * error**2`` over ``weight.sum()`` estimates
    the mean squared error over the whole vocabulary without bias."""

    genes: torch.Tensor
    values: torch.Tensor
    weight: torch.Tensor


def _profile(cells: _Cells, vocab_size: int, unexpressed: int, generator: torch.Generator) -> Profile:
    """Each cell's expressed genes with their values (normalised as the model's input, never binned)
    plus ``unexpressed`` genes drawn uniformly from the vocabulary, a draw of a gene the cell
    expresses dropped and the rest weighted (vocabulary - expressed) / kept draws, so zeros count
    as much as in the full profile. When the vocabulary is no larger than that, every gene is
    scored with weight 1 (the exact full profile: a small vocabulary only)."""
    n, longest = cells.genes.shape
    device, pad = cells.genes.device, pad_id(vocab_size)
    if longest + unexpressed >= vocab_size:
        values = torch.zeros((n, vocab_size + 1), dtype=torch.float32, device=device)
        values.scatter_(1, cells.genes, cells.values)  # (pads land in the extra column)
        genes = torch.arange(vocab_size, device=device).expand(n, vocab_size).clone()
        return Profile(genes, values[:, :vocab_size].contiguous(), torch.ones((n, vocab_size), device=device))
    lengths = cells.stored.sum(dim=1, keepdim=True)
    genes = torch.full((n, longest + unexpressed), pad, dtype=torch.int64, device=device)
    values = torch.zeros(genes.shape, dtype=torch.float32, device=device)
    weight = torch.zeros(genes.shape, dtype=torch.float32, device=device)
    genes[:, :longest], values[:, :longest], weight[:, :longest] = cells.genes, cells.values, cells.stored.float()
    drawn = torch.randint(0, vocab_size, (n, unexpressed), device=device, generator=generator)
    # does the cell express the drawn gene: a search in its sorted ids (the pad sentinel ends each row)
    ids = torch.cat((cells.genes, torch.full((n, 1), pad, dtype=torch.int64, device=device)), dim=1)
    hit = ids.gather(1, torch.searchsorted(ids, drawn)) == drawn
    kept = (~hit).sum(dim=1, keepdim=True)
    slots = lengths + torch.arange(unexpressed, device=device)
    genes.scatter_(1, slots, torch.where(hit, pad, drawn))
    share = (vocab_size - lengths).double() / kept.clamp(min=1).double()
    weight.scatter_(1, slots, torch.where(hit, 0.0, share).float())
    return Profile(genes, values, weight)


def build_batch(batch: SparseBatch, tok: TokenizerConfig, vocab_size: int, mask_ratio: float,
                recon_genes: int | None = None, choice: GeneChoice | None = None) -> Batch:
    """The ``Batch`` the model consumes, built on ``batch``'s device: tokenized (with the corpus's
    ``choice``), masked, and with ``recon_genes`` the profile the recon objective scores (that
    many unexpressed genes per cell); every draw from the generator ``batch.key`` seeds. The one
    place a training, validation or FLOP-counting batch is made."""
    generator = batch.generator()
    with _one_thread_on_cpu(batch.device):
        cells = _Cells.of(batch, tok, vocab_size)
        tokens = _tokenize(cells, tok, vocab_size, generator, choice)
        out = Batch(tokens.genes, tokens.values, mask_values(tokens.genes, vocab_size, mask_ratio, generator))
        if recon_genes is not None:
            p = _profile(cells, vocab_size, recon_genes, generator)
            out.profile_genes, out.profile_values, out.profile_weight = p.genes, p.values, p.weight
    return out


def mean_profile(matrix: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int) -> np.ndarray:
    """(vocab_size,) each gene's mean normalised value over the cells of ``matrix``, zeros included:
    what a decoder that knows nothing of the cell should predict (once per run, on the host)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    values = matrix.data.astype(np.float32) if cfg.normalization == "none" else \
        log1p_normalized(matrix, cfg.target_sum)
    totals = np.bincount(matrix.indices, weights=values, minlength=vocab_size)
    return (totals / max(matrix.shape[0], 1)).astype(np.float32)
