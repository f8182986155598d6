"""Tokenization of raw counts: normalisation, binning, gene selection, CLS, padding, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scgraph.config import TokenizerConfig
from scgraph.data.masking import mask_values
from scgraph.data.tokenize import bin_values, tokenize

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
    tokens = tokenize(cells({3: 7.0}), TokenizerConfig(seq_len=3, normalization="none", selection="top"), G)
    assert tokens.genes.tolist() == [[3, G, G]]
    assert tokens.values.tolist() == [[7.0, 0.0, 0.0]]


def test_cell_with_fewer_genes_than_length_is_padded():
    tokens = tokenize(cells({0: 1.0, 4: 3.0}), TokenizerConfig(seq_len=5, selection="random"), G, rng())
    assert sorted(tokens.genes[0, :2].tolist()) == [0, 4]
    assert tokens.genes[0, 2:].tolist() == [G, G, G]
    assert tokens.values[0, 2:].tolist() == [0.0, 0.0, 0.0]
    assert tokens.n_genes.tolist() == [2]


def test_cell_with_no_genes_is_all_padding_plus_cls():
    tokens = tokenize(cells({}, {2: 5.0}), TokenizerConfig(seq_len=3, cls_token=True), G, rng())
    assert tokens.genes[0].tolist() == [G + 1, G, G, G]
    assert tokens.values[0].tolist() == [0.0] * 4
    assert tokens.genes[1].tolist() == [G + 1, 2, G, G]
    assert tokens.n_genes.tolist() == [0, 1]


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
