"""``launchers/probe.py``: a pretrained checkpoint, labelled cells -> the paper's linear probe with
its two controls, figures, ``probe.json``, an optional embedding export, and an MLflow run linked
to the pretraining run.

Every check a user can fail (checkpoint, label column, classes, gene overlap) runs before the
cells are embedded, so a bad command ends in seconds with one line saying what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from scgraph.cli import Command, run
from scgraph.config import ProbeConfig
from scgraph.data.vocab import GeneVocab
from scgraph.eval.cells import Cells, match_genes, read_cells
from scgraph.eval.embed import embed_cells, random_encoder
from scgraph.eval.figures import confusion_plot, tsne_plot
from scgraph.eval.probe import LinearProbe, Scores, evaluate, logistic_regression
from scgraph.io.counts import log1p_cp10k
from scgraph.tracking import Tracker, check_store, flatten, git_commit
from scgraph.train.checkpointer import Pretrained, load_pretrained, resolve_checkpoint

#: The controls, as named in probe.json, MLflow metrics and the printed table.
CONTROLS = {"random_encoder": "random-init encoder, same shape",
            "logistic_regression": "logistic regression, log1p CP10k"}
PROBE_KIND = "probe"


def labelled_cells(labels: np.ndarray, key: str) -> tuple[np.ndarray, list[str]]:
    """Indices of the cells the probe can use, and what was left out and why. A stratified split
    needs two cells of a class, so a class of one is left out (and named); one class in all is an
    error, since there is nothing to classify."""
    present = np.array([label is not None for label in labels])
    classes, sizes = np.unique(labels[present].astype(str), return_counts=True)
    if len(classes) < 2:
        found = f"a single class ({str(classes[0])!r}, {sizes[0]} cells)" if len(classes) else "no labelled cell"
        raise ValueError(f"--label-key {key!r} has {found}: a classifier needs at least 2 classes")
    rare = set(classes[sizes < 2].tolist())
    keep = np.flatnonzero([label is not None and label not in rare for label in labels])
    notes = []
    if (~present).any():
        notes.append(f"{int((~present).sum())} cell(s) without a {key!r} label left out")
    if rare:
        notes.append(f"class(es) with a single cell left out (a stratified split needs 2): {', '.join(sorted(rare))}")
        if len(classes) - len(rare) < 2:
            raise ValueError(f"--label-key {key!r}: only one class has 2 or more cells; a classifier needs 2 such "
                             "classes")
    return keep, notes


def _summary(scores: Scores, n_cells: int, n_classes: int, genes_matched: int) -> dict[str, Any]:
    return scores.summary() | {"n_cells": n_cells, "n_classes": n_classes, "genes_matched": genes_matched}


def export_embeddings(cells: Cells, embeddings: np.ndarray, backbone: str, path: str | Path) -> str:
    """The read cells (all of them, in input order) with ``.obsm["X_scgraph_<backbone>"]``, ready
    for ``sc.pp.neighbors(adata, use_rep=...)``; returns the obsm key."""
    key = f"X_scgraph_{backbone}"
    cells.adata.obsm[key] = embeddings
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cells.adata.write_h5ad(path)
    return key


def run_probe(opts: ProbeConfig) -> dict[str, Any]:
    """The whole probe; returns what it writes to ``OUT/probe.json``."""
    resolve_checkpoint(opts.checkpoint)  # fail on a wrong path before reading any data
    if opts.mlflow_uri:
        check_store(opts.mlflow_uri)
    cells = read_cells(opts.data, opts.organism)
    labels = cells.labels(opts.label_key)
    keep, notes = labelled_cells(labels, opts.label_key)
    pretrained = load_pretrained(opts.checkpoint)
    match = match_genes(cells, GeneVocab(pretrained.meta["feature_ids"], pretrained.meta["feature_names"]),
                        opts.match_genes_by)
    counts = match.apply(cells.counts)
    run, backbone = pretrained.run, pretrained.run.model.backbone
    progress = not opts.quiet
    if match.dropped:
        notes.append(f"{match.dropped} of {match.matched + match.dropped} genes are not in the model's vocabulary "
                     "and were dropped")
    y = labels[keep].astype(str)
    classes = np.unique(y)
    embeddings = embed_cells(pretrained.model, run, counts, batch_size=opts.embed_batch_size, seed=opts.seed,
                             desc=f"embed ({backbone})", progress=progress)
    baseline = embed_cells(random_encoder(run, opts.seed), run, counts[keep], batch_size=opts.embed_batch_size,
                           seed=opts.seed, desc="embed (random encoder)", progress=progress)

    def probe(seed: int) -> LinearProbe:
        return LinearProbe(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
                           standardize=opts.standardize)

    split = dict(repeats=opts.repeats, seed=opts.seed, test_fraction=opts.test_fraction, progress=progress)
    scores = {"pretrained": evaluate(probe, embeddings[keep], y, desc=f"probe ({backbone})", **split),
              "random_encoder": evaluate(probe, baseline, y, desc="probe (random encoder)", **split),
              "logistic_regression": evaluate(logistic_regression, log1p_cp10k(counts[keep]), y,
                                              desc="logistic regression", **split)}
    size = (len(keep), len(classes), match.matched)
    dataset = opts.dataset_name or cells.name
    report: dict[str, Any] = _summary(scores["pretrained"], *size) | {
        "controls": {name: _summary(scores[name], *size) for name in CONTROLS},
        "genes_dropped": match.dropped, "repeats": opts.repeats, "test_fraction": opts.test_fraction,
        "standardize": opts.standardize,
        "accuracy_per_repeat": scores["pretrained"].accuracy, "macro_f1_per_repeat": scores["pretrained"].macro_f1,
        "backbone": backbone, "preset": run.model.preset,
        "model": {"hidden": run.model.hidden, "layers": run.model.layers, "seq_len": run.tokenizer.seq_len},
        "dataset": dataset, "label_key": opts.label_key,
        "checkpoint": str(pretrained.path.resolve()), "pretraining_run_id": pretrained.meta.get("mlflow_run_id"),
        "notes": notes}

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        tsne_plot(embeddings[keep], y, out / f"tsne_{backbone}.png", max_cells=opts.tsne_cells, seed=opts.seed,
                  title=f"{backbone} cell embeddings, {dataset} (t-SNE)"),
        confusion_plot(scores["pretrained"].y_true, scores["pretrained"].y_pred, classes,
                       out / f"confusion_{backbone}.png", title=f"Linear probe on {backbone}, {dataset} (repeat 1)")]
    if opts.export:
        report["export"] = {"path": str(Path(opts.export).resolve()),
                            "obsm_key": export_embeddings(cells, embeddings, backbone, opts.export)}
    _track(opts, pretrained, report, figures, out / "probe.json")
    print(format_report(report), flush=True)
    return report


def _track(opts: ProbeConfig, pretrained: Pretrained, report: dict[str, Any], figures: list[Path],
           json_path: Path) -> None:
    """One MLflow run in the pretraining run's store and experiment (unless told otherwise),
    tagged with the pretraining run's id; probe.json is written inside the run so it names it."""
    meta = pretrained.meta
    tracker = Tracker(active=True)
    params = flatten("", {"run": pretrained.run.to_dict()}) | {
        f"probe.{k}": v for k, v in asdict(opts).items() if k not in ("quiet", "mlflow_uri", "experiment")}
    tags = {"scgraph.kind": PROBE_KIND, "backbone": report["backbone"], "preset": report["preset"],
            "dataset": report["dataset"], "pretraining_run_id": str(report["pretraining_run_id"]),
            "checkpoint": report["checkpoint"], "git_commit": git_commit()}
    tracker.start(opts.mlflow_uri or meta.get("mlflow_uri"), opts.experiment or meta.get("experiment") or "scgraph",
                  f"probe-{report['backbone']}-{report['dataset']}", params, tags)
    try:
        metrics = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, summary in report["controls"].items():
            metrics |= {f"{name}.{k}": v for k, v in summary.items()}
        tracker.metrics(metrics)
        report["probe_run_id"] = tracker.run_id
        json_path.write_text(json.dumps(report, indent=2))
        for path in [json_path, *figures]:
            tracker.artifact(path)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()


def _cell(summary: dict[str, Any], metric: str) -> str:
    return f"{100 * summary[f'{metric}_mean']:6.2f} ± {100 * summary[f'{metric}_std']:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The printed table: the pretrained encoder and both controls, in percent, and one sentence
    saying whether pretraining beat the random encoder."""
    backbone, model = report["backbone"], report["model"]
    rows = [(f"pretrained {backbone} encoder", report)] + [
        (CONTROLS[name], report["controls"][name]) for name in CONTROLS]
    split = f"{round(100 * (1 - report['test_fraction']))}/{round(100 * report['test_fraction'])}"
    lines = [f"Linear probe: {backbone} ({report['preset']}, hidden {model['hidden']}, {model['layers']} layers, "
             f"L {model['seq_len']}) on {report['dataset']}: {report['n_cells']} cells, {report['n_classes']} classes, "
             f"{report['genes_matched']} genes matched ({report['genes_dropped']} dropped), {report['repeats']} "
             f"repeat(s) of a {split} stratified split; one linear layer on "
             f"{'z-scored' if report['standardize'] else 'raw'} embeddings",
             f"  {'':36}{'accuracy %':>16}{'macro-F1 %':>18}"]
    lines += [f"  {name:36}{_cell(s, 'accuracy'):>16}{_cell(s, 'macro_f1'):>18}" for name, s in rows]
    lines += [f"  note: {note}" for note in report["notes"]]
    gain = 100 * (report["accuracy_mean"] - report["controls"]["random_encoder"]["accuracy_mean"])
    if gain > 0:
        lines.append(f"  Pretraining beats the random encoder by {gain:+.2f} accuracy points.")
    else:
        lines.append(f"  Pretraining does NOT beat the randomly initialised encoder ({gain:+.2f} accuracy points): "
                     "what the probe finds here comes from the architecture and the expression values, not from "
                     "pretraining.")
    return "\n".join(lines)


COMMAND = Command(ProbeConfig, run_probe, prog="launchers/probe.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/probe.py``."""
    return run(COMMAND, argv)
