"""Labelled cells for evaluation, read from any source the sharding tool writes from or to, and
re-indexed onto a pretrained model's gene vocabulary.

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

from scgraph.data.shards import MANIFEST_NAME, ShardSet
from scgraph.data.vocab import GeneMap, GeneVocab
from scgraph.io.counts import check_counts
from scgraph.io.sources import SourceSpec, open_source, read_anndata


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


def _cells(counts: sp.csr_matrix, obs: pd.DataFrame, feature_ids: list[str], feature_names: list[str],
           name: str) -> Cells:
    var = pd.DataFrame({"feature_name": feature_names}, index=pd.Index(feature_ids, name="feature_id"))
    return Cells(ad.AnnData(X=counts, obs=obs, var=var), counts, feature_ids, feature_names, name)


def _read_h5ad(path: str) -> Cells:
    try:
        adata = read_anndata(path)
    except (OSError, KeyError) as err:
        raise ValueError(f"--data {path} is not a readable .h5ad file ({err})") from None
    return cells_of(adata, _dataset_name(path), where=f"--data {path}")


def cells_of(adata: ad.AnnData, name: str, where: str | None = None) -> Cells:
    """An AnnData's cells: raw counts from raw.X when present (the CELLxGENE convention for a
    normalised X), else X, as the sharding tool's ``--h5ad-matrix auto`` reads them; gene ids from
    var['feature_id'] (else the var names), names from var['feature_name'] (else the var names).
    A backed AnnData's matrix is read whole (evaluation data is small). Counts that are not counts,
    or a gene id twice (its columns would both be matched, silently), are refused naming ``where``
    (default ``name``) and the matrix, as ``sharding write`` refuses them."""
    source = adata.raw if adata.raw is not None else adata
    matrix = source.X[:] if adata.isbacked else source.X
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    var = source.var
    names = [str(x) for x in var.index]
    ids = [str(x) for x in var["feature_id"]] if "feature_id" in var.columns else names
    if "feature_name" in var.columns:
        names = [str(x) for x in var["feature_name"]]
    try:
        check_counts(counts, adata.obs_names)
        GeneVocab(ids, names)  # its validation: one column per gene id
    except ValueError as err:
        raise ValueError(f"{where or name} ({'raw.X' if adata.raw is not None else 'X'}): {err}") from None
    return Cells(adata, counts, ids, names, name)


def _read_shards(directory: str) -> Cells:
    """Every cell with every obs column stored with it; cells are named by soma_joinid."""
    shards = ShardSet.open(directory)
    joinids, counts, obs = shards.read_all()
    frame = pd.DataFrame.from_records(obs, index=pd.Index([str(j) for j in joinids], name="soma_joinid"))
    return _cells(counts, frame, list(shards.feature_ids), list(shards.feature_names), _dataset_name(directory))


def _read_soma(uri: str, organism: str) -> Cells:
    """Through the same readers as the sharding tool, so the census path
    (``cellxgene_census.open_soma``) is the one the pretraining data came through."""
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
        counts = sp.csr_matrix(source.read_counts(joinids), dtype=np.float32)
        obs = source.read_obs(joinids, [c for c in source.obs_columns if c != "soma_joinid"])
    frame = pd.DataFrame(obs, index=pd.Index([str(j) for j in joinids], name="soma_joinid"))
    return _cells(counts, frame, genes.feature_ids, genes.feature_names, _dataset_name(uri))


def coverage_notes(mapping: GeneMap, counts: sp.csr_matrix) -> list[str]:
    """What a user should know about how the data meets the model's vocabulary (``counts``: the
    data re-indexed onto it): less than half of the model's genes present (the encoder sees little
    of what it learnt), and cells with no count in any gene the model knows (each is embedded as an
    empty cell, the same vector for all)."""
    notes = []
    if mapping.matched < mapping.vocab_size / 2:
        notes.append(f"the data holds {mapping.matched} of the model's {mapping.vocab_size} genes "
                     f"({100 * mapping.matched / mapping.vocab_size:.0f} %): the encoder sees little of what it learnt")
    empty = int((np.diff(counts.indptr) == 0).sum())
    if empty:
        notes.append(f"{empty} cell(s) have no count in any gene the model knows: each is embedded as an empty cell")
    return notes


def match_genes(cells: Cells, vocab: GeneVocab, by: str = "feature_id") -> GeneMap:
    """How the cells' genes re-index onto the model's vocabulary; no gene in common is an error."""
    keys = cells.feature_ids if by == "feature_id" else cells.feature_names
    mapping = vocab.map_genes(keys, by)
    if not mapping.matched:
        ours = vocab.keys(by)
        raise ValueError(
            f"no gene of {cells.name} is in the checkpoint's vocabulary (matched by {by}): the data has "
            f"{', '.join(keys[:3])}, ...; the model has {', '.join(ours[:3])}, ... (match by feature_name for gene "
            f"symbols: --match-genes-by, or match_genes_by= in scgraph.embed; or write the data with --vocab-from "
            f"the pretraining shards)")
    return mapping
