"""Tokenization of raw counts: normalisation, binning, gene selection, CLS, padding, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scgraph.config import TokenizerConfig
from scgraph.data.masking import mask_values
from scgraph.data.shards.stats import GeneSummary
from scgraph.data.tokenize import GeneChoice, bin_values, tokenize

G = 20


def cells(*rows: dict[int, float]) -> sp.csr_matrix:
    dense = np.zeros((len(rows), G), dtype=np.float32)
    for i, row in enumerate(rows):
        for gene, count in row.items():
            dense[i, gene] = count
    return sp.csr_matrix(dense)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_log1p_library_size_normalisation_uses_all_genes_of_the_cell():
    counts = cells({1: 2.0, 5: 6.0, 9: 2.0})
    tokens = tokenize(counts, TokenizerConfig(seq_len=2, selection="top"), G)
    # total 10 -> scale 1e4/10; the top-2 are gene 5 (6 counts) then gene 1 (tie with 9, lower id)
    assert tokens.genes.tolist() == [[5, 1]]
    np.testing.assert_allclose(tokens.values, [[np.log1p(6000.0), np.log1p(2000.0)]], rtol=1e-6)


def test_no_normalisation_keeps_raw_counts():
    tokens = tokenize(cells({3: 7.0}, {1: 1.0, 2: 1.0, 4: 2.0}),
                      TokenizerConfig(seq_len=3, normalization="none", selection="top"), G)
    assert tokens.genes.tolist() == [[3, G, G], [4, 1, 2]]
    assert tokens.values.tolist() == [[7.0, 0.0, 0.0], [2.0, 1.0, 1.0]]


def test_a_batch_is_padded_to_its_longest_cell_not_to_seq_len():
    tokens = tokenize(cells({3: 7.0}, {1: 1.0, 2: 1.0}), TokenizerConfig(seq_len=500, cls_token=True), G, rng())
    assert tokens.genes.shape == (2, 3)  # CLS + the longest cell's 2 genes
    assert tokens.genes[0].tolist() == [G + 1, 3, G]


def test_cell_with_fewer_genes_than_length_is_padded():
    tokens = tokenize(cells({0: 1.0, 4: 3.0}, {g: 1.0 for g in range(5)}),
                      TokenizerConfig(seq_len=5, selection="random"), G, rng())
    assert sorted(tokens.genes[0, :2].tolist()) == [0, 4]
    assert tokens.genes[0, 2:].tolist() == [G, G, G]
    assert tokens.values[0, 2:].tolist() == [0.0, 0.0, 0.0]
    assert tokens.n_genes.tolist() == [2, 5]


def test_cell_with_no_genes_is_all_padding_plus_cls():
    tokens = tokenize(cells({}, {2: 5.0}, {1: 1.0, 3: 1.0}), TokenizerConfig(seq_len=3, cls_token=True), G, rng())
    assert tokens.genes[0].tolist() == [G + 1, G, G]
    assert tokens.values[0].tolist() == [0.0] * 3
    assert tokens.genes[1].tolist() == [G + 1, 2, G]
    assert tokens.n_genes.tolist() == [0, 1, 2]


def test_top_selection_keeps_the_most_expressed_genes():
    counts = cells({g: float(g + 1) for g in range(12)})
    tokens = tokenize(counts, TokenizerConfig(seq_len=4, selection="top"), G)
    assert tokens.genes.tolist() == [[11, 10, 9, 8]]


def test_random_selection_is_seeded_and_samples_only_nonzero_genes():
    counts = cells({g: 1.0 for g in range(0, 20, 2)}, {g: 2.0 for g in range(1, 20, 2)})
    cfg = TokenizerConfig(seq_len=4, selection="random")
    first = tokenize(counts, cfg, G, rng(7))
    assert np.array_equal(first.genes, tokenize(counts, cfg, G, rng(7)).genes)
    assert not np.array_equal(first.genes, tokenize(counts, cfg, G, rng(8)).genes)
    assert (first.genes[0] % 2 == 0).all() and (first.genes[1] % 2 == 1).all()
    assert all(len(set(row)) == 4 for row in first.genes.tolist())
    # every non-zero gene is picked sometimes: the sample is not a fixed prefix
    seen = {g for seed in range(30) for g in tokenize(counts, cfg, G, rng(seed)).genes[0]}
    assert seen == set(range(0, 20, 2))


def test_binning_maps_each_cells_values_to_its_own_quantile_bins():
    counts = cells({g: float(g + 1) for g in range(10)}, {g: float(100 * (g + 1)) for g in range(10)})
    tokens = tokenize(counts, TokenizerConfig(seq_len=10, n_bins=6, selection="top"), G)
    # both cells have the same ranks, so the same bins despite 100x depth
    assert tokens.values[0].tolist() == tokens.values[1].tolist()
    assert tokens.values.min() >= 1 and tokens.values.max() == 5
    assert tokens.values[0, 0] == 5 and tokens.values[0, -1] == 1  # highest gene first (top order)
    assert np.all(np.diff(tokens.values[0]) <= 0)


def test_binning_leaves_padding_at_zero():
    values = np.array([[3.0, 1.0, 0.0, 0.0]], dtype=np.float32)
    assert bin_values(values, np.array([2]), n_bins=5)[0, 2:].tolist() == [0.0, 0.0]


def test_cls_token_is_prepended_and_seq_len_counts_genes():
    cfg = TokenizerConfig(seq_len=3, cls_token=True, selection="top")
    tokens = tokenize(cells({g: 1.0 + g for g in range(6)}), cfg, G)
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
        tokenize(counts, TokenizerConfig(seq_len=4), G, rng())


def test_more_gene_columns_than_vocabulary_is_refused():
    with pytest.raises(ValueError, match="gene columns but the vocabulary has 10"):
        tokenize(cells({1: 1.0}), TokenizerConfig(seq_len=4), 10, rng())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seq_len": 0}, "seq_len must be > 0"),
    ({"n_bins": 1}, "n_bins must be >= 2"),
    ({"selection": "best"}, "selection must be one of random, top"),
    ({"normalization": "zscore"}, "normalization must be one of"),
])
def test_bad_tokenizer_config_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**kwargs)


def test_masking_picks_ratio_of_genes_never_padding_or_cls():
    counts = cells({g: 1.0 for g in range(20)}, {1: 1.0, 2: 1.0}, {})
    tokens = tokenize(counts, TokenizerConfig(seq_len=20, cls_token=True), G, rng())
    masked = mask_values(tokens.genes, G, 0.15, rng(1))
    assert masked.sum(axis=1).tolist() == [3, 1, 0]  # round(0.15*20)=3; at least one; none
    assert (tokens.genes[masked] < G).all()


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
    choice = GeneChoice.build(TokenizerConfig(), summary([1000.0, 10.0, 100.0]), "test")
    counts = cells({0: 500.0, 1: 40.0, 2: 300.0})  # this cell: half the housekeeping median, 4x the marker's
    top = tokenize(counts, TokenizerConfig(seq_len=1, selection="top"), G)
    rank = tokenize(counts, TokenizerConfig(seq_len=2, selection="rank"), G, choice=choice)
    assert top.genes.tolist() == [[0]]
    assert rank.genes.tolist() == [[1, 2]]  # 40/10 = 4 > 300/100 = 3 > 500/1000 = 0.5


def test_hvg_restriction_keeps_only_the_most_variable_genes_as_candidates():
    choice = GeneChoice.build(TokenizerConfig(hvg_genes=2), summary(variance=[0.1, 3.0, 0.2, 2.0]), "test")
    assert np.flatnonzero(choice.allowed).tolist() == [1, 3]
    counts = cells({0: 50.0, 1: 1.0, 2: 20.0, 3: 2.0}, {0: 5.0, 2: 5.0})
    tokens = tokenize(counts, TokenizerConfig(seq_len=3, selection="top", hvg_genes=2), G, choice=choice)
    assert tokens.genes.tolist() == [[3, 1], [G, G]]  # the second cell expresses no variable gene
    assert tokens.n_genes.tolist() == [2, 0]
    # values are still normalised over all the cell's genes (73 counts), not the candidates'
    np.testing.assert_allclose(tokens.values[0], np.log1p(np.array([2.0, 1.0]) * 1e4 / 73), rtol=1e-6)


@pytest.mark.parametrize(("tok", "message"), [
    (TokenizerConfig(selection="rank"), "selection 'rank' needs the training corpus's gene statistics"),
    (TokenizerConfig(hvg_genes=5), "hvg_genes 5 needs"),
])
def test_a_selection_that_needs_statistics_without_them_is_one_clear_error(tok, message):
    with pytest.raises(ValueError, match=message):
        tokenize(cells({1: 1.0}), tok, G, rng())
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
