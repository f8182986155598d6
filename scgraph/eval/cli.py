"""Command lines of ``launchers/probe.py`` and ``launchers/compare.py``.

A mistake a user can fix (a path without a model, an unknown label column, no gene in common, one
class) ends the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from scgraph.data.vocab import MATCH_KEYS
from scgraph.eval.compare import run_compare
from scgraph.eval.evaluate import ProbeOptions, run_probe

_PROBE_HELP = {
    "checkpoint": "a pretraining --output directory (its latest checkpoint), its checkpoints/ directory, or one "
                  "checkpoint directory",
    "data": "labelled cells: an .h5ad file (raw counts in raw.X or X), a shard directory (python -m sharding "
            "write), or a SOMA URI (a census-layout collection from build-soma, or a bare experiment)",
    "label_key": "obs column with the cell-type labels",
    "repeats": "repeats of split + probe, each with its own seed; results are mean ± std over them",
    "out": "output directory: probe.json and the figures",
    "mlflow_uri": "MLflow tracking URI (default: the checkpoint's, else $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    "experiment": "MLflow experiment (default: the pretraining run's)",
    "export": "write the input cells with their embeddings in .obsm['X_scgraph_<backbone>'] to this .h5ad",
    "dataset_name": "name of the data set in tables and MLflow (default: the file or directory name)",
    "match_genes_by": "how the data's genes are matched to the checkpoint's vocabulary",
    "organism": "experiment of a census-layout collection",
    "test_fraction": "share of each class held out for testing (the paper: 0.3)",
    "epochs": "probe training epochs (the paper: 50)",
    "batch_size": "probe batch size (the paper: 64)",
    "lr": "probe Adam learning rate (the paper: 0.005)",
    "standardize": "feed the raw embeddings to the linear layer; by default each feature is z-scored with the "
                   "training cells' mean and std first (still one linear map, but one Adam can fit in 50 epochs)",
    "seed": "seed of the splits, probe inits and the random-encoder control (repeat i uses seed + i)",
    "embed_batch_size": "cells per forward pass when embedding",
    "tsne_cells": "at most this many cells (a seeded sample) in the t-SNE figure",
}


def build_probe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchers/probe.py",
        description="The paper's linear probe: freeze the pretrained encoder, embed every cell, train one linear "
                    "layer as cell-type classifier on a 70/30 stratified split (50 epochs, batch 64, Adam lr "
                    "0.005), repeat with different seeds, report accuracy and macro-F1 as mean ± std, beside two "
                    "controls (a random-init encoder of the same shape; logistic regression on log1p CP10k). "
                    "Writes OUT/probe.json, a t-SNE and a confusion-matrix PNG, and an MLflow run tagged with the "
                    "pretraining run's id.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(ProbeOptions):
        if f.name == "progress":
            continue
        if str(f.type) == "bool":
            parser.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=_PROBE_HELP[f.name])
            continue
        flag = f"--{f.name.replace('_', '-')}"
        required = f.default is dataclasses.MISSING
        kind = {"int": int, "float": float}.get(str(f.type), str)
        extra = {"choices": MATCH_KEYS} if f.name == "match_genes_by" else {}
        parser.add_argument(flag, type=kind, required=required, help=_PROBE_HELP[f.name],
                            default=argparse.SUPPRESS if required else f.default, **extra)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchers/compare.py",
        description="The paper's Table II from an MLflow experiment: for each setting (hidden/L) and backbone, "
                    "forward FLOPs per cell and peak training memory of the pretraining run, the linear-probe "
                    "accuracy (mean ± std) on each probed data set, their average, and GNN − TF. Writes "
                    "OUT/table2.csv, table2.md and a bar chart table2.png, also as artifacts of a 'table2' run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment holding pretraining and probe runs")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                             "sqlite:///mlflow.db)")
    parser.add_argument("--out", default="runs/compare", help="output directory")
    return parser


def _run(action: Callable[[], object]) -> int:
    try:
        action()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def probe_main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_probe_parser().parse_args(argv))
    progress = not args.pop("quiet")
    return _run(lambda: run_probe(ProbeOptions(**args, progress=progress)))


def compare_main(argv: Sequence[str] | None = None) -> int:
    args = build_compare_parser().parse_args(argv)
    return _run(lambda: run_compare(args.experiment, args.mlflow_uri, args.out))
