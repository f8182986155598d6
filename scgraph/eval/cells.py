"""Labelled cells for evaluation, read from any source the sharding tool writes from or to, and
mapped onto a pretrained model's gene vocabulary.

A probe data set is small next to a pretraining corpus (thousands to tens of thousands of cells),
so it is read whole: the probe needs every embedding at once anyway. What is read is kept as an
AnnData so that ``--export`` can hand the same cells back to scanpy with their embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgraph.data.loader import iter_cells
from scgraph.data.shards import MANIFEST_NAME, ShardSet
from scgraph.data.vocab import GeneVocab
from sharding.sources import SourceSpec, check_raw_counts, open_source


@dataclass
class Cells:
    """Cells as read. ``adata`` is what ``--export`` writes back (the input .h5ad itself, or the
    cells of a shard set or SOMA experiment); ``counts`` are its raw counts in the source's genes."""

    adata: ad.AnnData
    counts: sp.csr_matrix
    feature_ids: list[str]
    feature_names: list[str]
    name: str

    def labels(self, key: str) -> np.ndarray:
        """Each cell's label as a string, None where it is missing; an unknown key lists the obs columns."""
        obs = self.adata.obs
        if key not in obs.columns:
            have = ", ".join(map(str, obs.columns)) or "none"
            raise ValueError(f"--label-key {key!r} is not an obs column of {self.name} (obs columns: {have})")
        column = obs[key]
        return np.array([None if pd.isna(v) else str(v) for v in column], dtype=object)


def read_cells(data: str, organism: str = "homo_sapiens") -> Cells:
    """An .h5ad file, a shard directory (``python -m sharding write``), or a SOMA URI: a
    census-layout collection (``build-soma``, the census itself) or a bare experiment."""
    local = "://" not in data
    if local and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    if local and os.path.isfile(os.path.join(data, MANIFEST_NAME)):
        cells = _read_shards(data)
    elif local and os.path.isfile(data):
        cells = _read_h5ad(data)
    else:
        cells = _read_soma(data, organism)
    if cells.counts.shape[0] == 0:
        raise ValueError(f"--data {data} holds no cells")
    return cells


def _dataset_name(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _read_h5ad(path: str) -> Cells:
    """Raw counts from raw.X when present (the CELLxGENE convention for a normalised X), else X,
    as the sharding tool's ``--h5ad-matrix auto`` reads them."""
    try:
        adata = ad.read_h5ad(path)
    except OSError as err:
        raise ValueError(f"--data {path} is not a readable .h5ad file ({err})") from None
    source = adata.raw if adata.raw is not None else adata
    counts = sp.csr_matrix(source.X, dtype=np.float32)
    check_raw_counts(counts, adata.obs_names)
    var = source.var
    names = [str(x) for x in var.index]
    ids = [str(x) for x in var["feature_id"]] if "feature_id" in var.columns else names
    if "feature_name" in var.columns:
        names = [str(x) for x in var["feature_name"]]
    return Cells(adata, counts, ids, names, _dataset_name(path))


def _read_shards(directory: str) -> Cells:
    """Every cell with every obs column stored with it; cells are named by soma_joinid."""
    shards = ShardSet.open(directory)
    joinids, genes, counts, obs = [], [], [], []
    for cell in iter_cells(shards):
        joinids.append(str(cell.soma_joinid))
        genes.append(cell.genes)
        counts.append(cell.counts)
        obs.append(cell.obs)
    indptr = np.concatenate(([0], np.cumsum([len(g) for g in genes])))
    matrix = sp.csr_matrix((np.concatenate(counts), np.concatenate(genes), indptr),
                           shape=(len(genes), shards.vocab_size))
    frame = pd.DataFrame.from_records(obs, index=pd.Index(joinids, name="soma_joinid"))
    var = pd.DataFrame({"feature_name": shards.feature_names}, index=pd.Index(shards.feature_ids, name="feature_id"))
    adata = ad.AnnData(X=matrix, obs=frame, var=var)
    return Cells(adata, matrix, list(shards.feature_ids), list(shards.feature_names), _dataset_name(directory))


def _read_soma(uri: str, organism: str) -> Cells:
    """Through the sharding tool's readers, so the census path (``cellxgene_census.open_soma``)
    is the one the pretraining data came through."""
    import tiledbsoma as soma

    try:
        with soma.open(uri) as obj:
            kind = "census-uri" if isinstance(obj, soma.Collection) and "census_data" in obj else "soma"
    except soma.SOMAError as err:
        raise ValueError(f"--data {uri} is neither an .h5ad file, a shard directory nor a SOMA object ({err})") \
            from None
    with open_source(SourceSpec(kind, uri, organism=organism)) as source:
        genes = source.genes()
        joinids = source.select(None)
        if not len(joinids):
            raise ValueError(f"--data {uri} holds no cells")
        counts, obs = source.read_block(joinids, [c for c in source.obs_columns if c != "soma_joinid"])
    counts = sp.csr_matrix(counts, dtype=np.float32)
    frame = pd.DataFrame(obs, index=pd.Index([str(j) for j in joinids], name="soma_joinid"))
    var = pd.DataFrame({"feature_name": genes.feature_names},
                       index=pd.Index(genes.feature_ids, name="feature_id"))
    adata = ad.AnnData(X=counts, obs=frame, var=var)
    return Cells(adata, counts, genes.feature_ids, genes.feature_names, _dataset_name(uri))


@dataclass
class GeneMatch:
    """The cells' counts re-indexed to the model's vocabulary, and how many genes made it."""

    counts: sp.csr_matrix
    matched: int
    dropped: int


def match_genes(cells: Cells, vocab: GeneVocab, by: str = "feature_id") -> GeneMatch:
    """Genes the model never saw have no embedding, so they are dropped (and counted); counts of
    genes the model knows move to the model's columns. No gene in common is an error."""
    keys = cells.feature_ids if by == "feature_id" else cells.feature_names
    positions = vocab.positions(keys, by=by)
    known = positions >= 0
    if not known.any():
        ours = vocab.feature_ids if by == "feature_id" else vocab.feature_names
        raise ValueError(
            f"no gene of {cells.name} is in the checkpoint's vocabulary (matched by {by}): the data has "
            f"{', '.join(keys[:3])}, ...; the model has {', '.join(ours[:3])}, ... (use --match-genes-by "
            f"feature_name for gene symbols, or write the data with --vocab-from the pretraining shards)")
    coo = cells.counts.tocoo()
    keep = known[coo.col]
    counts = sp.csr_matrix((coo.data[keep], (coo.row[keep], positions[coo.col[keep]])),
                           shape=(coo.shape[0], len(vocab)), dtype=np.float32)
    return GeneMatch(counts=counts, matched=int(known.sum()), dropped=int((~known).sum()))
