"""Tokenization of raw counts (batched torch ops on a ``SparseBatch``): normalisation, binning, gene
selection, CLS, padding, masks, profiles and bad input, each against a plain per-cell reference on
hand-made cells. The references draw the same torch numbers in the same order (one generator per
batch key, draws of shape cells x longest cell), so random modes are compared bit for bit too."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scgraph.config import TokenizerConfig
from scgraph.data.batch import SparseBatch
from scgraph.data.masking import mask_values
from scgraph.data.shards.stats import GeneSummary
from scgraph.data.tokenize import GeneChoice, _Cells, bin_values, build_batch, token_counts, tokenize

G = 20


def cells(*rows: dict[int, float]) -> sp.csr_matrix:
    dense = np.zeros((len(rows), G), dtype=np.float32)
    for i, row in enumerate(rows):
        for gene, count in row.items():
            dense[i, gene] = count
    return sp.csr_matrix(dense)


#: A tokenizer without gene dropout: what these tests check is the selection itself (dropout, on by
#: default in training, has its own tests below).
selection_only = functools.partial(TokenizerConfig, gene_dropout=0.0)


def rng(seed: int = 0) -> tuple[int, ...]:
    """A batch key: what seeds a batch's draws (the loader's is (seed, epoch, stream, batch))."""
    return (seed,)


def tokens_of(counts: sp.spmatrix, cfg: TokenizerConfig, vocab_size: int, key: tuple[int, ...] | None = None,
              choice: GeneChoice | None = None):
    """``tokenize`` on the CPU as numpy arrays (``key`` None: no generator, as a deterministic
    selection needs none)."""
    batch = SparseBatch.from_csr(counts, key or (0,), vocab_size)
    out = tokenize(batch, cfg, vocab_size, None if key is None else batch.generator(), choice)
    return dataclasses.replace(out, genes=out.genes.numpy(), values=out.values.numpy(), n_genes=out.n_genes.numpy())


def generator(key: tuple[int, ...]) -> torch.Generator:
    """The generator a CPU batch with ``key`` draws from (what the references replay)."""
    return SparseBatch.from_csr(sp.csr_matrix((1, 1)), key, 1).generator()


def test_log1p_library_size_normalisation_uses_all_genes_of_the_cell():
    counts = cells({1: 2.0, 5: 6.0, 9: 2.0})
    tokens = tokens_of(counts, selection_only(seq_len=2, selection="top"), G)
    # total 10 -> scale 1e4/10; the top-2 are gene 5 (6 counts) then gene 1 (tie with 9, lower id)
    assert tokens.genes.tolist() == [[5, 1]]
    np.testing.assert_allclose(tokens.values, [[np.log1p(6000.0), np.log1p(2000.0)]], rtol=1e-6)


@pytest.mark.parametrize("target_sum", [1e4, 1e6])
def test_normalisation_equals_io_counts_bit_for_bit_on_many_cells(target_sum):
    """The tokenizer's values are the host's normalisation (statistics, mean profile) to the bit:
    numpy computes the scale in float32 for float32 counts; a float64 scale changed 2-5 % of these
    values by an ulp."""
    from scgraph.io.counts import log1p_normalized

    gen = np.random.default_rng(5)
    counts = sp.random(64, 3000, density=0.15, format="csr", random_state=gen, dtype=np.float32)
    counts.data = gen.geometric(0.3, counts.nnz).astype(np.float32)
    cfg = selection_only(seq_len=3000, selection="top", target_sum=target_sum)
    batch = SparseBatch.from_csr(counts, (0,), 3000)
    cells = _Cells.of(batch, cfg, 3000)
    np.testing.assert_array_equal(cells.values[cells.stored].numpy(), log1p_normalized(counts, target_sum))


def test_no_normalisation_keeps_raw_counts():
    tokens = tokens_of(cells({3: 7.0}, {1: 1.0, 2: 1.0, 4: 2.0}),
                      selection_only(seq_len=3, normalization="none", selection="top"), G)
    assert tokens.genes.tolist() == [[3, G, G], [4, 1, 2]]
    assert tokens.values.tolist() == [[7.0, 0.0, 0.0], [2.0, 1.0, 1.0]]


def test_a_batch_is_padded_to_its_longest_cell_not_to_seq_len():
    tokens = tokens_of(cells({3: 7.0}, {1: 1.0, 2: 1.0}), TokenizerConfig(seq_len=500, cls_token=True), G, rng())
    assert tokens.genes.shape == (2, 3)  # CLS + the longest cell's 2 genes
    assert tokens.genes[0].tolist() == [G + 1, 3, G]


def test_cell_with_fewer_genes_than_length_is_padded():
    tokens = tokens_of(cells({0: 1.0, 4: 3.0}, {g: 1.0 for g in range(5)}),
                      TokenizerConfig(seq_len=5, selection="random"), G, rng())
    assert sorted(tokens.genes[0, :2].tolist()) == [0, 4]
    assert tokens.genes[0, 2:].tolist() == [G, G, G]
    assert tokens.values[0, 2:].tolist() == [0.0, 0.0, 0.0]
    assert tokens.n_genes.tolist() == [2, 5]


def test_cell_with_no_genes_is_all_padding_plus_cls():
    tokens = tokens_of(cells({}, {2: 5.0}, {1: 1.0, 3: 1.0}), TokenizerConfig(seq_len=3, cls_token=True), G, rng())
    assert tokens.genes[0].tolist() == [G + 1, G, G]
    assert tokens.values[0].tolist() == [0.0] * 3
    assert tokens.genes[1].tolist() == [G + 1, 2, G]
    assert tokens.n_genes.tolist() == [0, 1, 2]


def test_a_batch_of_empty_cells_is_cls_and_nothing_else():
    counts = cells({}, {})
    tokens = tokens_of(counts, TokenizerConfig(seq_len=3, cls_token=True, n_bins=3), G, rng())
    assert tokens.genes.tolist() == [[G + 1], [G + 1]] and tokens.values.tolist() == [[0.0], [0.0]]
    batch = build_batch(SparseBatch.from_csr(counts, rng(), G), TokenizerConfig(seq_len=3), G, 0.15, recon_genes=2)
    assert batch.genes.shape == (2, 0) and not batch.masked.any()
    assert (batch.profile_weight == G / 2).all()  # two draws each, none can hit


def test_top_selection_keeps_the_most_expressed_genes():
    counts = cells({g: float(g + 1) for g in range(12)})
    tokens = tokens_of(counts, selection_only(seq_len=4, selection="top"), G)
    assert tokens.genes.tolist() == [[11, 10, 9, 8]]


def test_random_selection_is_seeded_and_samples_only_nonzero_genes():
    counts = cells({g: 1.0 for g in range(0, 20, 2)}, {g: 2.0 for g in range(1, 20, 2)})
    cfg = selection_only(seq_len=4, selection="random")
    first = tokens_of(counts, cfg, G, rng(7))
    assert np.array_equal(first.genes, tokens_of(counts, cfg, G, rng(7)).genes)
    assert not np.array_equal(first.genes, tokens_of(counts, cfg, G, rng(8)).genes)
    assert (first.genes[0] % 2 == 0).all() and (first.genes[1] % 2 == 1).all()
    assert all(len(set(row)) == 4 for row in first.genes.tolist())
    # every non-zero gene is picked sometimes: the sample is not a fixed prefix
    seen = {g for seed in range(30) for g in tokens_of(counts, cfg, G, rng(seed)).genes[0]}
    assert seen == set(range(0, 20, 2))


def test_binning_maps_each_cells_values_to_its_own_quantile_bins():
    counts = cells({g: float(g + 1) for g in range(10)}, {g: float(100 * (g + 1)) for g in range(10)})
    tokens = tokens_of(counts, selection_only(seq_len=10, n_bins=6, selection="top"), G)
    # both cells have the same ranks, so the same bins despite 100x depth
    assert tokens.values[0].tolist() == tokens.values[1].tolist()
    assert tokens.values.min() >= 1 and tokens.values.max() == 5
    assert tokens.values[0, 0] == 5 and tokens.values[0, -1] == 1  # highest gene first (top order)
    assert np.all(np.diff(tokens.values[0]) <= 0)


def test_binning_leaves_padding_at_zero():
    values = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    assert bin_values(values, torch.tensor([2]), n_bins=5)[0, 2:].tolist() == [0.0, 0.0]


def reference_bins(values: np.ndarray, n_genes: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-cell binning the plain numpy way: each cell's values by its own quantiles."""
    out = np.zeros_like(values)
    for i, k in enumerate(n_genes):
        if k:
            row = values[i, :k]
            edges = np.quantile(row, np.linspace(0.0, 1.0, n_bins))
            out[i, :k] = np.clip(np.digitize(row, edges[1:-1], right=True) + 1, 1, n_bins - 1)
    return out


@pytest.mark.parametrize("n_bins", [2, 3, 5, 51])
def test_batched_binning_equals_numpys_quantiles_per_cell(n_bins):
    gen = np.random.default_rng(0)
    values = np.log1p(gen.integers(1, 30, (40, 23)) * gen.random((40, 1)) * 100).astype(np.float32)
    values[::3, 5:9] = values[::3, :1]  # ties
    n_genes = gen.integers(0, 24, 40)
    values[np.arange(23) >= n_genes[:, None]] = 0.0
    got = bin_values(torch.from_numpy(values), torch.from_numpy(n_genes), n_bins).numpy()
    np.testing.assert_array_equal(got, reference_bins(values, n_genes, n_bins))


def test_cls_token_is_prepended_and_seq_len_counts_genes():
    cfg = selection_only(seq_len=3, cls_token=True, selection="top")
    tokens = tokens_of(cells({g: 1.0 + g for g in range(6)}), cfg, G)
    assert tokens.genes.shape == (1, 4)
    assert tokens.genes[0].tolist() == [G + 1, 5, 4, 3]
    assert tokens.values[0, 0] == 0.0


@pytest.mark.parametrize(("data", "message"), [
    (np.nan, "NaN or infinite"),
    (np.inf, "NaN or infinite"),
    (-2.0, "negative values"),
])
def test_bad_counts_are_a_clear_value_error(data, message):
    counts = cells({1: 1.0, 2: 1.0})
    counts.data[1] = data
    with pytest.raises(ValueError, match=message):
        tokens_of(counts, TokenizerConfig(seq_len=4), G, rng())


def test_more_gene_columns_than_vocabulary_is_refused():
    with pytest.raises(ValueError, match="gene columns but the vocabulary has 10"):
        tokens_of(cells({1: 1.0}), TokenizerConfig(seq_len=4), 10, rng())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seq_len": 0}, "seq_len must be > 0"),
    ({"n_bins": 1}, "n_bins must be >= 2"),
    ({"selection": "best"}, "selection must be one of random, top"),
    ({"normalization": "zscore"}, "normalization must be one of"),
    ({"gene_dropout": 1.0}, r"gene_dropout must be in \[0, 1\); got 1.0"),
])
def test_bad_tokenizer_config_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**kwargs)


def test_masking_picks_ratio_of_genes_never_padding_or_cls():
    counts = cells({g: 1.0 for g in range(20)}, {1: 1.0, 2: 1.0}, {})
    genes = torch.from_numpy(tokens_of(counts, TokenizerConfig(seq_len=20, cls_token=True), G, rng()).genes)
    masked = mask_values(genes, G, 0.15, generator(rng(1)))
    assert masked.sum(dim=1).tolist() == [3, 1, 0]  # round(0.15*20)=3; at least one; none
    assert (genes[masked] < G).all()


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 0.9, 1.0])
def test_masks_equal_a_per_cell_reference_with_the_stated_ratio(ratio):
    """Each cell: the round(ratio x genes) (at least one) genes with the smallest of the same draws."""
    counts = cells(*EDGE_CELLS)
    for cls_token in (False, True):
        genes = torch.from_numpy(tokens_of(counts, selection_only(seq_len=11, cls_token=cls_token), G, rng()).genes)
        got = mask_values(genes, G, ratio, generator(rng(2))).numpy()
        draws = torch.rand(genes.shape, dtype=torch.float64, generator=generator(rng(2))).numpy()
        for row, (ids, masked) in enumerate(zip(genes.numpy(), got)):
            at = np.flatnonzero(ids < G)
            n = 0 if not len(at) else max(1, int(np.rint(ratio * len(at))))
            expected = np.zeros(len(ids), dtype=bool)
            expected[at[np.argsort(draws[row, at], kind="stable")[:n]]] = True
            np.testing.assert_array_equal(masked, expected)
            assert masked.sum() == n


def summary(median_counts=(), variance=()) -> GeneSummary:
    """Hand-written statistics of a G-gene corpus: the first genes' medians (as counts per 10,000)
    and variances given, the rest unexpressed."""
    median, var = np.zeros(G), np.zeros(G)
    median[: len(median_counts)], var[: len(variance)] = median_counts, variance
    return GeneSummary(cells=100, expressing=(median > 0) * 10.0, mean_nonzero=np.ones(G),
                       median_nonzero=np.log1p(median), variance=var)


def test_normalised_rank_puts_a_rare_marker_above_a_housekeeping_gene_that_top_keeps():
    # gene 0: a housekeeping gene every cell expresses highly (median 1,000 CP10k); gene 1: a marker
    # whose few expressing cells hold it at a median of 10; gene 2: ordinary (median 100)
    choice = GeneChoice.build(selection_only(), summary([1000.0, 10.0, 100.0]), "test")
    counts = cells({0: 500.0, 1: 40.0, 2: 300.0})  # this cell: half the housekeeping median, 4x the marker's
    top = tokens_of(counts, selection_only(seq_len=1, selection="top"), G)
    rank = tokens_of(counts, selection_only(seq_len=2, selection="rank"), G, choice=choice)
    assert top.genes.tolist() == [[0]]
    assert rank.genes.tolist() == [[1, 2]]  # 40/10 = 4 > 300/100 = 3 > 500/1000 = 0.5


def test_hvg_restriction_keeps_only_the_most_variable_genes_as_candidates():
    choice = GeneChoice.build(selection_only(hvg_genes=2), summary(variance=[0.1, 3.0, 0.2, 2.0]), "test")
    assert np.flatnonzero(choice.allowed).tolist() == [1, 3]
    counts = cells({0: 50.0, 1: 1.0, 2: 20.0, 3: 2.0}, {0: 5.0, 2: 5.0})
    tokens = tokens_of(counts, selection_only(seq_len=3, selection="top", hvg_genes=2), G, choice=choice)
    assert tokens.genes.tolist() == [[3, 1], [G, G]]  # the second cell expresses no variable gene
    assert tokens.n_genes.tolist() == [2, 0]
    # values are still normalised over all the cell's genes (73 counts), not the candidates'
    np.testing.assert_allclose(tokens.values[0], np.log1p(np.array([2.0, 1.0]) * 1e4 / 73), rtol=1e-6)


@pytest.mark.parametrize(("tok", "message"), [
    (selection_only(selection="rank"), "selection 'rank' needs the training corpus's gene statistics"),
    (selection_only(hvg_genes=5), "hvg_genes 5 needs"),
])
def test_a_selection_that_needs_statistics_without_them_is_one_clear_error(tok, message):
    with pytest.raises(ValueError, match=message):
        tokens_of(cells({1: 1.0}), tok, G, rng())
    with pytest.raises(ValueError, match="python -m sharding stats DIR"):
        GeneChoice.build(tok, None, "DIR")


def test_hvg_genes_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=rf"hvg_genes \(25\) is larger than the vocabulary \({G} genes\)"):
        GeneChoice.build(TokenizerConfig(hvg_genes=25), summary(), "test")


def test_gene_choice_round_trips_through_a_checkpoint_record():
    choice = GeneChoice.build(TokenizerConfig(hvg_genes=1), summary([10.0, 20.0], [1.0, 0.5]), "test")
    again = GeneChoice.from_record(json.loads(json.dumps(choice.to_record())), G)
    np.testing.assert_array_equal(again.median, choice.median)
    np.testing.assert_array_equal(again.allowed, choice.allowed)
    assert again.median[2] == 15.0  # an unexpressed gene ranks as the median gene does


def test_gene_choice_pickles_without_its_device_copies():
    """A spawned DataLoader worker gets the choice pickled: never the trainer's (CUDA) tensors."""
    import pickle

    choice = GeneChoice.build(TokenizerConfig(hvg_genes=1), summary([10.0, 20.0], [1.0, 0.5]), "test")
    median, allowed = choice.on(torch.device("cpu"))
    assert median.shape == allowed.shape == (G + 2,) and not allowed[G:].any()  # pad and CLS: never candidates
    again = pickle.loads(pickle.dumps(choice))
    assert again._on == {} and np.array_equal(again.allowed, choice.allowed)


# The batched selection against a plain per-cell reference: the same genes, values and order, bit
# for bit, for the same rng state (resume and the tests above rely on exact batches).

EDGE_CELLS = (
    {},  # empty
    {3: 2.0},  # shorter than L
    {1: 1.0, 6: 4.0, 8: 1.0, 17: 2.0},  # exactly L
    {0: 1.0, 2: 3.0, 4: 1.0, 5: 3.0, 7: 2.0, 9: 1.0, 11: 3.0, 13: 1.0, 19: 2.0},  # ties in count
    {g: 1.0 for g in range(0, 20, 2)} | {g: 1.0 for g in (1, 3)},  # all tied
    {g: float(g % 7 + 1) for g in range(15)},
    {g: float(1 + g * 37 % 11) for g in range(2, 20)},
)


def normalised(counts, target_sum=1e4):
    """(cells, G) the one normalisation's values (io.counts), dense."""
    from scgraph.io.counts import log1p_normalized
    return sp.csr_matrix((log1p_normalized(counts, target_sum), counts.indices, counts.indptr),
                         shape=counts.shape).toarray()


def reference_tokens(counts, cfg, key=None, choice=None):
    """Tokens the plain way: per cell, its candidate genes ordered by the selection's key (ties by
    gene id), the first seq_len kept; values from the one normalisation over the whole cell. Random
    keys are the batch's torch draws (cells x longest cell, dropout's first), cell i's candidates
    reading row i at their stored positions."""
    dense = counts.toarray()
    width = np.diff(counts.indptr).max(initial=0)
    gen = None if key is None else generator(key)

    def draws():
        return torch.rand((counts.shape[0], width), dtype=torch.float64, generator=gen).numpy()

    stored = [np.flatnonzero(row != 0) for row in dense]
    values = dense.astype(np.float32) if cfg.normalization == "none" else normalised(counts, cfg.target_sum)
    allowed = np.ones(G, dtype=bool) if choice is None or choice.allowed is None else choice.allowed
    candidates = [np.flatnonzero((row != 0) & allowed) for row in dense]
    if cfg.gene_dropout:  # a draw per stored gene; only cells with more than L lose the hidden ones
        hide = draws()
        candidates = [c[hide[i, np.searchsorted(stored[i], c)] >= cfg.gene_dropout] if len(c) > cfg.seq_len else c
                      for i, c in enumerate(candidates)]
    select = draws() if cfg.selection in ("random", "weighted") else None
    rows = []
    for i, genes in enumerate(candidates):
        if cfg.selection == "top":
            key = [-values[i, g] for g in genes]
        elif cfg.selection == "rank":
            key = [-(dense[i, g] / choice.median[g]) for g in genes]
        elif len(genes) <= cfg.seq_len:
            key = list(range(len(genes)))  # stored order
        else:
            key = []
            for g in genes:
                u = select[i, np.searchsorted(stored[i], g)]
                if cfg.selection == "weighted":
                    e = -np.log1p(-u) / max(values[i, g], np.float32(1e-12))
                    u = e / (1.0 + e)
                key.append(u)
        order = sorted(range(len(genes)), key=lambda j: (key[j], genes[j]))[: cfg.seq_len]
        rows.append((genes[order], values[i, genes[order]]))
    n_genes = np.array([len(g) for g, _ in rows], dtype=np.int64)
    offset = int(bool(cfg.cls_token))
    width = n_genes.max(initial=0) + offset
    out_genes = np.full((len(rows), width), G, dtype=np.int64)
    out_values = np.zeros((len(rows), width), dtype=np.float32)
    for i, (g, v) in enumerate(rows):
        out_genes[i, offset:offset + len(g)], out_values[i, offset:offset + len(g)] = g, v
    if cfg.n_bins is not None:
        out_values[:, offset:] = reference_bins(out_values[:, offset:], n_genes, cfg.n_bins)
    if cfg.cls_token:
        out_genes[:, 0] = G + 1
    return out_genes, out_values, n_genes


EDGE_CHOICE = GeneChoice(median=np.array([1.0, 2.0, 0.5, 2.0, 1.0] * 4), allowed=np.arange(G) % 3 != 1)


@pytest.mark.parametrize("selection", ["random", "weighted", "top", "rank"])
@pytest.mark.parametrize("seq_len", [1, 4, 11, 30])
@pytest.mark.parametrize(("hvg", "cls_token", "n_bins", "normalization"), [
    (False, False, None, "log1p"), (True, True, None, "log1p"), (False, True, 3, "log1p"), (True, False, None, "none"),
])
def test_batched_selection_equals_a_per_cell_reference_bit_for_bit(selection, seq_len, hvg, cls_token, n_bins,
                                                                   normalization):
    cfg = TokenizerConfig(seq_len=seq_len, selection=selection, cls_token=cls_token, n_bins=n_bins,
                          normalization=normalization, hvg_genes=7 if hvg else None)
    choice = EDGE_CHOICE if hvg else GeneChoice(median=EDGE_CHOICE.median)
    counts = cells(*EDGE_CELLS)
    for seed in range(3):
        got = tokens_of(counts, cfg, G, rng(seed), choice)
        genes, values, n_genes = reference_tokens(counts, cfg, rng(seed), choice)
        np.testing.assert_array_equal(got.genes, genes)
        np.testing.assert_array_equal(got.values, values)  # bit for bit: assert_array_equal, no tolerance
        np.testing.assert_array_equal(got.n_genes, n_genes)
        assert got.values.dtype == np.float32 and got.genes.dtype == np.int64


@pytest.mark.parametrize("seq_len", [1, 4, 30])
@pytest.mark.parametrize("hvg", [False, True])
def test_token_counts_are_the_genes_a_cell_shows_without_dropout(seq_len, hvg):
    """What the loader groups cells by: read from the counts alone, before any cell is tokenized."""
    cfg = TokenizerConfig(seq_len=seq_len, selection="top", gene_dropout=0.0, hvg_genes=7 if hvg else None)
    choice = EDGE_CHOICE if hvg else None
    counts = cells(*EDGE_CELLS)
    np.testing.assert_array_equal(token_counts(counts, cfg, choice), tokens_of(counts, cfg, G, choice=choice).n_genes)


@pytest.mark.parametrize("selection", ["random", "weighted", "top", "rank"])
@pytest.mark.parametrize("hvg", [False, True])
def test_gene_dropout_hides_genes_of_cells_longer_than_l_as_the_reference_does(selection, hvg):
    cfg = TokenizerConfig(seq_len=4, selection=selection, gene_dropout=0.4, hvg_genes=7 if hvg else None)
    choice = EDGE_CHOICE if hvg else GeneChoice(median=EDGE_CHOICE.median)
    counts = cells(*EDGE_CELLS)
    plain = tokens_of(counts, dataclasses.replace(cfg, gene_dropout=0.0), G, rng(), choice)
    shown = set()
    for seed in range(3):
        got = tokens_of(counts, cfg, G, rng(seed), choice)
        genes, values, n_genes = reference_tokens(counts, cfg, rng(seed), choice)
        np.testing.assert_array_equal(got.genes, genes)
        np.testing.assert_array_equal(got.values, values)
        np.testing.assert_array_equal(got.n_genes, n_genes)
        shown.add(got.genes.tobytes())
        short = plain.n_genes < cfg.seq_len  # every candidate shown anyway: nothing hidden
        np.testing.assert_array_equal(got.genes[short, :4], plain.genes[short, :4])
    if selection in ("top", "rank"):
        assert len(shown) > 1  # a deterministic selection now varies from draw to draw
    with pytest.raises(ValueError, match="gene dropout needs a torch.Generator"):
        tokens_of(counts, cfg, G, None, choice)


def test_inference_hides_no_gene_of_a_model_trained_with_gene_dropout():
    from scgraph.eval.embed import inference_tokenizer

    counts = cells(*EDGE_CELLS)
    for selection in ("train", "top", "random", "all"):
        assert inference_tokenizer(TokenizerConfig(gene_dropout=0.3), selection, None, counts).gene_dropout == 0.0


def test_random_selection_of_long_cells_equals_the_reference_with_many_draws():
    # ~2,000-gene cells: one draw per stored gene, the L smallest kept (a stable sort of the draws)
    gen = np.random.default_rng(3)
    dense = np.zeros((6, 3000), dtype=np.float32)
    for i, k in enumerate([0, 40, 600, 1500, 2500, 3000]):
        dense[i, gen.choice(3000, k, replace=False)] = gen.integers(1, 5, k)
    counts = sp.csr_matrix(dense)
    cfg = selection_only(seq_len=512, selection="random")
    got = tokens_of(counts, cfg, 3000, rng(5))
    draws = torch.rand((6, 3000), dtype=torch.float64, generator=generator(rng(5))).numpy()
    for i, row in enumerate(dense):
        genes = np.flatnonzero(row)
        if len(genes) > 512:
            genes = genes[np.argsort(draws[i, :len(genes)], kind="stable")[:512]]
        assert got.genes[i, : len(genes)].tolist() == genes.tolist()


def reference_profile(counts, unexpressed, drawn):
    """Profiles the plain way: each cell's genes and values (weight 1), then its row of draws, a
    draw of a gene it expresses dropped, the rest weighted (vocabulary - expressed) / kept."""
    values = normalised(counts)
    width = np.diff(counts.indptr).max() + unexpressed
    genes, vals, weight = np.full((counts.shape[0], width), G), np.zeros((counts.shape[0], width)), \
        np.zeros((counts.shape[0], width))
    for i in range(counts.shape[0]):
        expressed = np.flatnonzero(values[i])
        k = len(expressed)
        genes[i, :k], vals[i, :k], weight[i, :k] = expressed, values[i, expressed], 1.0
        hit = np.isin(drawn[i], expressed)
        genes[i, k:k + unexpressed] = np.where(hit, G, drawn[i])
        weight[i, k:k + unexpressed] = np.where(hit, 0.0, (G - k) / max(int((~hit).sum()), 1))
    return genes, vals.astype(np.float32), weight.astype(np.float32)


#: deterministic tokens (no draws), so a batch's draws are its masks' then its profile's
PROFILED = selection_only(seq_len=4, selection="top")


@pytest.mark.parametrize("unexpressed", [1, 3, 4])
def test_profile_equals_a_per_cell_reference_bit_for_bit(unexpressed):
    counts = cells(*EDGE_CELLS[:-1])  # at most 15 genes: 15 + 4 < 20 draws from the non-expressed
    for seed in range(3):
        got = build_batch(SparseBatch.from_csr(counts, rng(seed), G), PROFILED, G, 0.15, recon_genes=unexpressed)
        gen = generator(rng(seed))
        torch.rand(got.genes.shape, dtype=torch.float64, generator=gen)  # the masks' draws come first
        drawn = torch.randint(0, G, (counts.shape[0], unexpressed), generator=gen).numpy()
        genes, values, weight = reference_profile(counts, unexpressed, drawn)
        np.testing.assert_array_equal(got.profile_genes.numpy(), genes)
        np.testing.assert_array_equal(got.profile_values.numpy(), values)
        np.testing.assert_array_equal(got.profile_weight.numpy(), weight)
        assert (got.profile_weight[got.profile_genes == G] == 0).all() and got.profile_weight.dtype == torch.float32
        # the weights of each cell sum to the vocabulary when a draw was kept: an unbiased estimate
        kept = (got.profile_weight > 0).sum(dim=1) > torch.from_numpy(np.diff(counts.indptr))
        assert torch.allclose(got.profile_weight.sum(dim=1)[kept], torch.tensor(float(G)))


def test_a_profile_as_long_as_the_vocabulary_is_the_exact_full_profile():
    counts = cells(*EDGE_CELLS)  # 18 genes + 2 draws >= 20: every gene, weight 1, no draws
    got = build_batch(SparseBatch.from_csr(counts, rng(), G), PROFILED, G, 0.15, recon_genes=2)
    assert got.profile_genes.tolist() == [list(range(G))] * len(EDGE_CELLS)
    np.testing.assert_array_equal(got.profile_values.numpy(), normalised(counts).astype(np.float32))
    assert (got.profile_weight == 1).all()


def test_a_batch_is_the_same_for_its_key_and_another_for_another_key():
    counts = cells(*EDGE_CELLS)
    tok = TokenizerConfig(seq_len=4, selection="random", gene_dropout=0.3)

    def made(key):
        return build_batch(SparseBatch.from_csr(counts, key, G), tok, G, 0.3, recon_genes=1)

    a, b, other = made((1, 0, 0, 5)), made((1, 0, 0, 5)), made((1, 0, 0, 6))
    for name in ("genes", "values", "masked", "profile_genes", "profile_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not all(torch.equal(getattr(a, n), getattr(other, n)) for n in ("genes", "masked", "profile_genes"))
    assert a.genes.dtype == torch.int64 and a.values.dtype == torch.float32 and a.masked.dtype == torch.bool
