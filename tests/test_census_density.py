"""Census density: per-gene statistics in the manifest, token selection that reads them (in training
and in ``scgraph.embed`` alike), length-ordered embedding, and the probe's collapse diagnostics.
The real set is Zeisel et al.'s mouse brain cells (2,341 expressed genes per cell, median)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scgraph.cli import run
from scgraph.config import ModelConfig, RunConfig, TokenizerConfig
from scgraph.data.datasets import load_zeisel
from scgraph.data.shards import ShardSet
from scgraph.data.shards.stats import BINS_PER_UNIT, GeneStats
from scgraph.eval.embed import embed, embed_cells
from scgraph.eval.probe import collapse_diagnostics
from scgraph.io.counts import log1p_cp10k
from scgraph.models.model import build_model
from scgraph.train.checkpointer import load_pretrained
from scgraph.train.trainer import COMMAND as PRETRAIN
from sharding.cli import main as sharding

CELLS = 300


@pytest.fixture(scope="module")
def zeisel(tmp_path_factory):
    """300 real census-density cells as an .h5ad, written once as a shard set and once as two slices."""
    folder = tmp_path_factory.mktemp("zeisel")
    data = load_zeisel()
    pick = np.random.default_rng(0).choice(len(data.labels), CELLS, replace=False)
    adata = ad.AnnData(X=data.counts[np.sort(pick)], var=pd.DataFrame(index=data.gene_ids),
                       obs=pd.DataFrame({"cell_type": pd.Categorical(data.labels[np.sort(pick)])},
                                        index=[f"z{i}" for i in np.sort(pick)]))
    adata.write_h5ad(folder / "cells.h5ad")
    write = ["write", "--quiet", "--h5ad", str(folder / "cells.h5ad"), "--cells-per-shard", "50"]
    assert sharding([*write, "--out", str(folder / "one")]) == 0
    for i in range(2):
        assert sharding([*write, "--out", str(folder / f"part{i}"), "--slice", f"{i}/2"]) == 0
    assert sharding(["merge", "--out", str(folder / "merged"), str(folder / "part0"), str(folder / "part1")]) == 0
    return folder, adata


def test_manifest_gene_statistics_equal_numpy_and_merge_equals_one_writer(zeisel):
    folder, adata = zeisel
    stats = ShardSet.open(str(folder / "one")).gene_stats
    values = log1p_cp10k(adata.X).toarray().astype(np.float64)
    expressed = values > 0
    assert stats.cells == CELLS
    np.testing.assert_array_equal(stats.expressing, expressed.sum(axis=0))
    np.testing.assert_allclose(stats.mean(), values.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(stats.variance, values.var(axis=0), atol=1e-5)
    masked = np.where(expressed, values, np.nan)
    # the middle value (of an even count, the lower one); a gene no cell expresses: 0
    exact = np.nan_to_num(np.nanquantile(masked, 0.5, axis=0, method="inverted_cdf"))
    assert np.abs(stats.median_nonzero - exact).max() <= 1 / BINS_PER_UNIT + 1e-6
    assert np.abs(stats.mean_nonzero - np.nan_to_num(np.nanmean(masked, axis=0))).max() < 1e-5
    merged = json.loads((folder / "merged" / "manifest.json").read_text())["gene_stats"]
    single = json.loads((folder / "one" / "manifest.json").read_text())["gene_stats"]
    assert merged == single  # fixed-point sums add exactly in any order (the sha256 of the same bytes too)


def test_stats_command_adds_them_to_an_older_set_and_verify_checks_their_file(zeisel, tmp_path, capsys):
    folder, _ = zeisel
    older = tmp_path / "older"
    older.mkdir()
    for shard in (folder / "one").glob("shard-*.tar"):
        (older / shard.name).write_bytes(shard.read_bytes())
    manifest = json.loads((folder / "one" / "manifest.json").read_text())
    recorded = manifest.pop("gene_stats")
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet.open(str(older)).gene_stats is None
    code = run(PRETRAIN, ["--shards", str(older), "--selection", "rank", "--output", str(tmp_path / "o"),
                          "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--no-system-metrics"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"python -m sharding stats {older}" in err, err
    assert not (tmp_path / "o").exists()
    assert sharding(["stats", "--quiet", str(older)]) == 0
    added = json.loads((older / "manifest.json").read_text())["gene_stats"]
    assert {k: added[k] for k in ("expressing", "median_nonzero", "variance")} == \
        {k: recorded[k] for k in ("expressing", "median_nonzero", "variance")}
    assert sharding(["verify", "--quiet", str(older)]) == 0
    stats = GeneStats.load(str(older / "gene_stats.npz"))
    stats.expressing[0] += 1
    stats.save(str(older / "gene_stats.npz"))
    assert sharding(["verify", "--quiet", str(older)]) == 1
    assert "gene_stats.npz: sha256 mismatch" in capsys.readouterr().err


def test_hvg_genes_larger_than_the_vocabulary_is_a_one_line_error(zeisel, tmp_path, capsys):
    folder, _ = zeisel
    code = run(PRETRAIN, ["--shards", str(folder / "one"), "--hvg-genes", "5000", "--output", str(tmp_path / "o"),
                          "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--no-system-metrics"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "hvg_genes (5000) is larger than the vocabulary (4000 genes)" in err, err


def test_training_records_its_gene_choice_and_embed_selects_as_training_did(zeisel, tmp_path):
    folder, adata = zeisel
    out = tmp_path / "run"
    code = run(PRETRAIN, ["--shards", str(folder / "one"), "--selection", "rank", "--hvg-genes", "500",
                          "--backbone", "gnn", "--hidden", "16", "--layers", "1", "--adjacency-rank", "4",
                          "--seq-len", "32", "--batch-size", "16", "--max-steps", "3", "--output", str(out),
                          "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--no-system-metrics"])
    assert code == 0
    pretrained = load_pretrained(str(out))
    variance = ShardSet.open(str(folder / "one")).gene_stats.variance
    assert set(np.flatnonzero(pretrained.record.choice.allowed)) == set(np.argsort(-variance, kind="stable")[:500])
    embed(adata, str(out), progress=False)  # the default protocol: as in training
    same = embed_cells(pretrained.model, pretrained.run, adata.X, selection="rank", choice=pretrained.record.choice,
                       progress=False)
    top = embed_cells(pretrained.model, pretrained.run, adata.X, selection="top", choice=pretrained.record.choice,
                      progress=False)
    np.testing.assert_allclose(adata.obsm["X_scgraph"], same, atol=1e-6)
    assert not np.allclose(same, top, atol=1e-3)  # (rank and top show different genes at this density)
    assert adata.uns["X_scgraph"]["selection"] == "rank"


@pytest.mark.parametrize("backbone", ["gnn_linear", "transformer"])
def test_length_ordered_batches_embed_every_gene_as_one_cell_at_a_time(zeisel, backbone):
    _, adata = zeisel
    run_cfg = RunConfig(model=ModelConfig(backbone=backbone, hidden=16, layers=1, heads=2, adjacency_rank=4,
                                          vocab_size=adata.n_vars), tokenizer=TokenizerConfig(seq_len=64))
    torch.manual_seed(0)
    model = build_model(run_cfg.model).eval()
    counts = adata.X[:12]
    together = embed_cells(model, run_cfg, counts, selection="all", batch_size=5, progress=False)
    alone = np.concatenate([embed_cells(model, run_cfg, counts[i:i + 1], selection="all", batch_size=1,
                                        progress=False) for i in range(12)])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_collapse_diagnostics_tell_a_depth_only_embedding_from_a_full_rank_one():
    rng = np.random.default_rng(0)
    library, genes = rng.lognormal(8, 0.6, 1000), rng.integers(500, 3000, 1000)
    depth_only = np.outer(np.log1p(library), rng.normal(size=32)) + 1e-4 * rng.normal(size=(1000, 32))
    full = rng.normal(size=(1000, 32))
    collapsed, healthy = collapse_diagnostics(depth_only, library, genes), collapse_diagnostics(full, library, genes)
    assert collapsed["effective_rank"] < 1.5 and healthy["effective_rank"] > 25
    assert collapsed["library_size_r2"] > 0.99 and healthy["library_size_r2"] < 0.01
    assert collapsed["n_genes_r2"] < 0.01
