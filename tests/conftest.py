"""Shared fixtures: real data as census-layout SOMA stores and .h5ad files, built once per session
in temp dirs, and generators for what no real set has (a size, an identifiable cell, a defect)."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sharding.layout import build_census_layout


def cbmc_anndata() -> ad.AnnData:
    """CITE-seq CBMC (7,839 cells x 500 genes, 11 labels), raw counts in X, label in obs."""
    from scgraph.data.datasets import load_cbmc

    data = load_cbmc()
    obs = pd.DataFrame(
        {"label": pd.Categorical(data.labels)}, index=[f"cbmc{i}" for i in range(len(data.labels))]
    )
    return ad.AnnData(X=data.counts, obs=obs, var=pd.DataFrame(index=data.gene_ids))


def pbmc68k_counts() -> ad.AnnData:
    """pbmc68k_reduced (700 cells, real gene symbols) with approximate raw counts in X (DATA.md)."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    norm = sp.csr_matrix(adata.raw.X)
    counts = norm.copy()
    counts.data = np.expm1(counts.data) * np.repeat(
        adata.obs["n_counts"].to_numpy() / 1e4, np.diff(norm.indptr)
    )
    counts.data = np.rint(counts.data).astype(np.float32)
    counts.eliminate_zeros()
    obs = adata.obs[["bulk_labels"]].copy()
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=adata.raw.var_names.astype(str)))


def generated_counts(n_cells: int, n_genes: int, genes_per_cell: int, seed: int = 0) -> sp.csr_matrix:
    """Integer counts with exactly ``genes_per_cell`` distinct non-zero genes per cell (a window of
    consecutive genes at a random start: cheap to generate at any size)."""
    rng = np.random.default_rng(seed)
    cols = (rng.integers(0, n_genes, size=(n_cells, 1)) + np.arange(genes_per_cell)) % n_genes
    data = rng.integers(1, 30, size=(n_cells, genes_per_cell)).astype(np.float32)
    indptr = np.arange(n_cells + 1) * genes_per_cell
    return sp.csr_matrix((data.ravel(), cols.ravel(), indptr), shape=(n_cells, n_genes))


def generated_anndata(counts: sp.csr_matrix, n_labels: int = 3) -> ad.AnnData:
    n_cells, n_genes = counts.shape
    obs = pd.DataFrame(
        {"label": pd.Categorical([f"type{i % n_labels}" for i in range(n_cells)])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)]))


@pytest.fixture(scope="session")
def cbmc() -> ad.AnnData:
    return cbmc_anndata()


@pytest.fixture(scope="session")
def cbmc_census(tmp_path_factory, cbmc) -> str:
    """The real CBMC data as a local census-layout collection (the census code path, offline)."""
    return build_census_layout(
        cbmc, os.path.join(tmp_path_factory.mktemp("census"), "cbmc"), label_key="label"
    )


@pytest.fixture(scope="session")
def pbmc() -> ad.AnnData:
    return pbmc68k_counts()


@pytest.fixture(scope="session")
def pbmc_h5ad(tmp_path_factory, pbmc) -> str:
    path = os.path.join(tmp_path_factory.mktemp("h5ad"), "pbmc68k.h5ad")
    pbmc.write_h5ad(path)
    return path
