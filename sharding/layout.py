"""build-soma: an AnnData (.h5ad) as a local copy of the CELLxGENE Census layout.

The census is unreachable offline, so the demo and the tests stand it in with a collection that
``cellxgene_census.open_soma(uri=PATH)`` opens exactly like the real one: ``census_info`` (a
``summary`` table) and ``census_data/<organism>``, an Experiment with measurement "RNA" whose X
layer "raw" holds integer counts and whose obs/var carry the census columns (soma_joinid,
cell_type, assay, tissue, disease, dataset_id, is_primary_data, ...; feature_id, feature_name).
"""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.io

from scgraph.data.shards.config import BuildSomaConfig
from scgraph.io.counts import check_counts
from scgraph.io.sources import read_anndata

#: Census obs columns filled from the .h5ad when it has them, else with this placeholder.
CENSUS_OBS_DEFAULTS: dict[str, object] = {
    "dataset_id": "local",
    "assay": "unknown",
    "assay_ontology_term_id": "unknown",
    "cell_type": "unknown",
    "cell_type_ontology_term_id": "unknown",
    "disease": "unknown",
    "disease_ontology_term_id": "unknown",
    "donor_id": "unknown",
    "sex": "unknown",
    "suspension_type": "cell",
    "tissue": "unknown",
    "tissue_ontology_term_id": "unknown",
    "tissue_general": "unknown",
    "is_primary_data": True,
}


def census_obs(obs: pd.DataFrame, label_key: str | None, dataset_id: str) -> pd.DataFrame:
    """The .h5ad's obs plus every census column, ``label_key`` copied to ``cell_type``."""
    out = obs.copy()
    if label_key is not None:
        if label_key not in obs.columns:
            raise ValueError(
                f"--label-key {label_key!r} is not an obs column (have: {', '.join(obs.columns)})"
            )
        out["cell_type"] = obs[label_key].astype(str).astype("category")
    for column, default in CENSUS_OBS_DEFAULTS.items():
        if column not in out.columns:
            value = dataset_id if column == "dataset_id" else default
            out[column] = pd.Categorical([value] * len(out)) if isinstance(value, str) else value
    out["is_primary_data"] = out["is_primary_data"].astype(bool)
    return out


def census_var(var: pd.DataFrame) -> pd.DataFrame:
    """``feature_id`` (var['feature_id'], var['gene_ids'] or the index) and ``feature_name``."""
    out = var.copy()
    names = var.index.astype(str)
    if "feature_id" not in out.columns:
        out["feature_id"] = var["gene_ids"].astype(str) if "gene_ids" in var.columns else names
    if "feature_name" not in out.columns:
        out["feature_name"] = names
    for column in ("feature_id", "feature_name"):
        out[column] = out[column].astype(str)
    if out["feature_id"].duplicated().any():
        dup = out["feature_id"][out["feature_id"].duplicated()].iloc[0]
        raise ValueError(f"var feature_id values must be unique; {dup!r} repeats")
    return out


def build_census_layout(
    adata: ad.AnnData,
    out: str,
    *,
    label_key: str | None = None,
    organism: str = "homo_sapiens",
    dataset_id: str = "local",
    use_raw: bool | None = None,
) -> str:
    """Write ``adata`` as a census-layout collection at ``out``; return its URI. Raw counts come
    from raw.X when ``use_raw`` (default: when adata has raw, the CELLxGENE convention), else X."""
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; build-soma never overwrites")
    raw = adata.raw if (use_raw or (use_raw is None and adata.raw is not None)) else None
    counts = sp.csr_matrix(raw.X if raw is not None else adata.X)
    check_counts(counts, adata.obs_names)
    cells = ad.AnnData(
        X=counts.astype(np.float32),
        obs=census_obs(adata.obs, label_key, dataset_id),
        var=census_var(raw.var if raw is not None else adata.var),
    )
    uri = os.path.abspath(out)
    with soma.Collection.create(uri) as census:
        info = census.add_new_collection("census_info")
        summary = pa.table(
            {
                "label": ["census_schema_version", "census_build_date", "total_cell_count"],
                "value": ["local", "local", str(adata.n_obs)],
            }
        )
        with info.add_new_dataframe(
            "summary",
            schema=summary.schema,
            index_column_names=["soma_joinid"],
            domain=[(0, summary.num_rows - 1)],
        ) as table:
            table.write(summary.append_column("soma_joinid", pa.array(np.arange(summary.num_rows))))
        data = census.add_new_collection("census_data")
        exp_uri = f"{uri}/census_data/{organism}"
        tiledbsoma.io.from_anndata(
            exp_uri,
            cells,
            measurement_name="RNA",
            X_layer_name="raw",
            obs_id_name="obs_id",
            var_id_name="var_id",
        )
        with soma.Experiment.open(exp_uri) as exp:
            data.set(organism, exp, use_relative_uri=True)
    return uri


def build_census_layout_from_h5ad(
    h5ad: str,
    out: str,
    *,
    label_key: str | None = None,
    organism: str = "homo_sapiens",
    use_raw: bool | None = None,
) -> str:
    """The ``build-soma`` command. Loads the file whole: it stands in for a census, so it is small."""
    if not os.path.isfile(h5ad):
        raise FileNotFoundError(f"--h5ad {h5ad}: no such file")
    adata = read_anndata(h5ad)
    dataset_id = os.path.splitext(os.path.basename(h5ad))[0]
    return build_census_layout(
        adata, out, label_key=label_key, organism=organism, dataset_id=dataset_id, use_raw=use_raw
    )


def build_soma_command(cfg: BuildSomaConfig) -> None:
    """``python -m sharding build-soma``."""
    use_raw = {"auto": None, "X": False, "raw": True}[cfg.h5ad_matrix]
    uri = build_census_layout_from_h5ad(cfg.h5ad, cfg.out, label_key=cfg.label_key, organism=cfg.organism,
                                        use_raw=use_raw)
    print(f"{uri}: census layout written (open with cellxgene_census.open_soma(uri=...))")
