"""The configurations of the evaluation commands: the probe (``launchers/probe.py``) and the
Table II comparison (``launchers/compare.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from scgraph.cli import option
from scgraph.config import EMBED_SELECTIONS, MATCH_KEYS, check_choice, check_positive


@dataclass
class ProbeConfig:
    """The paper's linear probe: freeze the pretrained encoder, embed every cell, train one linear layer as
    cell-type classifier on a 70/30 stratified split (50 epochs, batch 64, Adam lr 0.005), repeat with different
    seeds, report accuracy and macro-F1 as mean ± std, with kNN accuracy (k = 10) and the agreement of k-means
    clusters with the labels (ARI, NMI) and the label silhouette, beside four controls scored the same way (a
    random-init encoder of the same shape, a bag of genes — the mean of a random gene table over the genes each
    cell shows —, PCA-50 of log1p CP10k, logistic regression on log1p CP10k), and each embedding's effective rank
    and the share of it that library size and genes per cell explain (collapse shows there). Writes OUT/probe.json,
    a t-SNE and a confusion-matrix PNG, and an MLflow run tagged with the pretraining run's id."""

    checkpoint: str = option(help="a pretraining --output directory (its latest checkpoint), its checkpoints/ "
                             "directory, one checkpoint directory, an exported model/ folder, or runs:/RUN_ID/model "
                             "(from --mlflow-uri)")
    data: str = option(help="labelled cells: an .h5ad file (raw counts in raw.X or X), a shard directory (python -m "
                       "sharding write), or a SOMA URI (a census-layout collection from build-soma, or a bare "
                       "experiment)")
    label_key: str = option("cell_type", "obs column with the cell-type labels")
    repeats: int = option(5, "repeats of split + probe, each with its own seed; results are mean ± std over them")
    out: str = option("runs/probe", "output directory: probe.json and the figures")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: the checkpoint's, else $MLFLOW_TRACKING_URI "
                                    "or sqlite:///mlflow.db)")
    experiment: str | None = option(None, "MLflow experiment (default: the pretraining run's)")
    export: str | None = option(None, "write the input cells with their embeddings in "
                                ".obsm['X_scgraph_<backbone>'] to this .h5ad")
    dataset_name: str | None = option(None, "name of the data set in tables and MLflow (default: the file or "
                                      "directory name)")
    match_genes_by: str = option("feature_id", "how the data's genes are matched to the checkpoint's vocabulary",
                                 choices=MATCH_KEYS)
    organism: str = option("homo_sapiens", "experiment of a census-layout collection")
    test_fraction: float = option(0.3, "share of each class held out for testing (the paper: 0.3)")
    epochs: int = option(50, "probe training epochs (the paper: 50)")
    batch_size: int = option(64, "probe batch size (the paper: 64)")
    lr: float = option(0.005, "probe Adam learning rate (the paper: 0.005)")
    standardize: bool = option(True, "z-score each embedding feature with the training cells' mean and std before "
                               "the linear layer (still one linear map, but one Adam can fit in 50 epochs); "
                               "--no-standardize feeds the raw embeddings")
    seed: int = option(0, "seed of the splits, probe inits and the random-encoder control (repeat i uses seed + i)")
    embed_batch_size: int = option(256, "cells per forward pass when embedding")
    embed_selection: str = option("train", "which genes each cell shows the encoder (and the controls): as the "
                                  "encoder was trained (train: the same selection, seeded where random), its top "
                                  "--embed-seq-len by expression or by normalised rank, a seeded random "
                                  "--embed-seq-len, or all", choices=EMBED_SELECTIONS)
    embed_seq_len: int | None = option(None, "genes per cell when embedding (default: the training L)")
    tsne_cells: int = option(2000, "at most this many cells (a seeded sample) in the t-SNE figure")
    quiet: bool = option(False, "no progress bars")
    overwrite: bool = option(False, "replace what --out and --export hold from another probe (another checkpoint or "
                             "other settings); without it they are refused")

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1; got {self.repeats}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in (0, 1); got {self.test_fraction}")
        check_choice("--match-genes-by", self.match_genes_by, MATCH_KEYS)
        if self.tsne_cells < 2:
            raise ValueError(f"--tsne-cells must be >= 2; got {self.tsne_cells}")
        if self.export is not None and not self.export.endswith(".h5ad"):
            raise ValueError(f"--export must name an .h5ad file; got {self.export!r}")
        if self.embed_seq_len is not None:
            check_positive("--embed-seq-len", self.embed_seq_len)


@dataclass
class CompareConfig:
    """The paper's Table II from an MLflow experiment: for each setting (hidden/L) and backbone, forward FLOPs per
    cell and peak training memory of the pretraining run, the linear-probe accuracy (mean ± std) on each probed data
    set, their average, and GNN − TF. Writes OUT/table2.csv, table2.md and a bar chart table2.png, also as
    artifacts of a 'table2' run."""

    experiment: str = option(help="MLflow experiment holding pretraining and probe runs")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    out: str = option("runs/compare", "output directory")
