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

# C++ ops that DeepSpeed builds at start (the CPU shared-memory all-reduce) go under the repository's
# .venv, not ~/.cache: the suite then never waits on a lock that another checkout's killed build left.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".venv", "torch_extensions"))


def cbmc_anndata() -> ad.AnnData:
    """CITE-seq CBMC (7,839 cells x 500 genes, 11 labels), raw counts in X, label in obs."""
    from scgraph.data.datasets import load_cbmc

    data = load_cbmc()
    obs = pd.DataFrame(
        {"label": pd.Categorical(data.labels)}, index=[f"cbmc{i}" for i in range(len(data.labels))]
    )
    return ad.AnnData(X=data.counts, obs=obs, var=pd.DataFrame(index=data.gene_ids))


def pbmc68k_counts() -> ad.AnnData:
    """pbmc68k_reduced (700 cells, real gene symbols) with approximate raw counts in X."""
    from scgraph.data.datasets import load_pbmc68k_reduced

    data = load_pbmc68k_reduced()
    obs = pd.DataFrame({"bulk_labels": pd.Categorical(data.labels)},
                       index=[f"pbmc{i}" for i in range(len(data.labels))])
    return ad.AnnData(X=data.counts, obs=obs, var=pd.DataFrame(index=data.gene_ids))


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


#: The demo pipeline at test size: 2 layers, hidden 32, L 64, 3 steps on 2 CPU ranks, 400 held-out cells.
TINY_DEMO = dict(hidden=32, layers=2, heads=4, adjacency_rank=8, seq_len=64, batch_size=16, micro_batch_size=4,
                 steps=3, held_out_cells=400, repeats=2)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The demo's own steps, run once: the real CBMC cells as a census-layout collection with a
    held-out split, shards of each split through the census path, and both backbones pretrained
    with the real deepspeed launcher into one MLflow store. Tests probe and compare on these."""
    from scgraph.demo import DEMO_BACKBONES, Demo, DemoConfig

    demo = Demo(DemoConfig(out=str(tmp_path_factory.mktemp("demo")), experiment="tiny", **TINY_DEMO))
    demo.build_census()
    demo.write_shards("shards_pretrain", demo.pretrain_shards, "pretrain")
    demo.write_shards("shards_heldout", demo.heldout_shards, "heldout", demo.pretrain_shards)
    for backbone in DEMO_BACKBONES:
        demo.pretrain(backbone)
    return demo


@pytest.fixture(scope="session")
def heldout_h5ad(tiny_demo) -> str:
    """The demo's held-out cells as an .h5ad with the label in obs 'cell_type', plus 20 genes the
    model never saw (copies of real genes' counts under new ids)."""
    adata = ad.read_h5ad(tiny_demo.root / "cbmc.h5ad")
    held = adata[adata.obs["split"] == "heldout"]
    extra = ad.AnnData(X=held.X[:, :20], obs=held.obs, var=pd.DataFrame(index=[f"UNSEEN{i:02d}" for i in range(20)]))
    cells = ad.concat([held, extra], axis=1, merge="first")
    cells.obs = held.obs.rename(columns={"label": "cell_type"})
    path = tiny_demo.root / "heldout_extra_genes.h5ad"
    cells.write_h5ad(path)
    return str(path)


@pytest.fixture(scope="session")
def probes(tiny_demo, heldout_h5ad) -> dict[str, dict]:
    """Both backbones probed on the held-out cells: the GNN by the demo's probe step (the real
    launchers/probe.py on the held-out shards), the Transformer in-process from the .h5ad, with
    --export. Returns each probe.json."""
    import json

    from scgraph.eval.evaluate import main as probe_main

    tiny_demo.probe("gnn")
    out = tiny_demo.root / "probe" / "transformer"
    code = probe_main(["--checkpoint", str(tiny_demo.pretrain_output("transformer")), "--data", heldout_h5ad,
                       "--dataset-name", "cbmc", "--repeats", "2", "--out", str(out), "--tsne-cells", "200",
                       "--export", str(out / "exported.h5ad"), "--quiet"])
    assert code == 0
    return {b: json.loads((tiny_demo.root / "probe" / b / "probe.json").read_text()) for b in ("gnn", "transformer")}


# --- helpers shared by tests (test-only code lives here, not in the library) ----------------------


def encode_npy(array: np.ndarray) -> bytes:
    """A 1-D little-endian array as the .npy member a shard holds."""
    from scgraph.data.shards import npy_header

    return npy_header(array.dtype.str, len(array)) + array.tobytes()


def encode_sample(joinid: int, genes: np.ndarray, counts: np.ndarray, obs: dict) -> bytes:
    """One cell's three tar members, as the writer encodes them."""
    from scgraph.data.shards import encode_block, encode_obs

    return encode_block([int(joinid)], np.array([0, len(genes)]), genes, counts, [encode_obs(obs)]).tobytes()


def iter_cells(shards):
    """Every cell of a shard set (a ShardSet or its directory), in stored order."""
    from scgraph.data.shards import ShardSet

    return (shards if isinstance(shards, ShardSet) else ShardSet.open(str(shards))).iter_cells()


def dense_graph_mixer(mixer, h, genes, attn_mask):
    """The GNN mixer's formula with A[g, g] materialised: softmax(scale U[g] V[g]^T) H W_v per
    adjacency head, padded keys masked, then the output projection."""
    import torch

    q, k = mixer.adjacency.queries_keys(genes)  # (B, heads, L, w)
    b, heads, n, _ = q.shape
    v = mixer.value(h).view(b, n, heads, -1).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) * mixer.scale).masked_fill(~attn_mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return mixer.out(out.transpose(1, 2).reshape(b, n, -1))


def moved_from_init(checkpoint) -> dict[str, float]:
    """How far each weight matrix of a pretrained model moved from its initialisation (rebuilt from
    the run's seed, as the trainer builds it): ||w - w0|| / ||w0||, by parameter name."""
    import torch

    from scgraph.models.model import build_model
    from scgraph.train.checkpointer import load_pretrained

    pretrained = load_pretrained(checkpoint)
    torch.manual_seed(pretrained.run.train.seed)
    start = dict(build_model(pretrained.run.model).named_parameters())
    return {name: float((p.detach() - start[name].detach()).norm() / start[name].detach().norm())
            for name, p in pretrained.model.named_parameters() if p.ndim == 2}


def digests(path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256); {} if there is nothing."""
    from pathlib import Path

    from scgraph.io.files import file_sha256

    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def stored_artifacts(store: str, run_id: str):
    """The folder of a run's artifacts in a SQLite store's mlartifacts (where every scgraph run keeps
    them), and the names in it."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from scgraph.tracking import local_artifacts

    folder = local_artifacts(store, MlflowClient(store).get_run(run_id).info.artifact_uri)
    assert folder is not None, "artifacts are not beside the store"
    return Path(folder), {p.name for p in Path(folder).iterdir()} if Path(folder).is_dir() else set()
