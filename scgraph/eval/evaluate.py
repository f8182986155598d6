"""``launchers/probe.py``: a pretrained checkpoint, labelled cells -> the paper's linear probe with
its controls, figures, ``probe.json``, an optional embedding export, and an MLflow run linked
to the pretraining run.

Every check a user can fail (checkpoint, output paths, label column, classes, gene overlap) runs
before the cells are embedded, so a bad command ends in seconds with one line saying what to fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scgraph.cli import Command, run
from scgraph.eval.cells import Cells, coverage_notes, match_genes, read_cells
from scgraph.eval.config import ProbeConfig
from scgraph.eval.embed import BagOfGenes, embed_cells, genes_shown, random_encoder, resolved_selection
from scgraph.eval.figures import confusion_plot, tsne_plot
from scgraph.eval.probe import (
    LinearProbe,
    clustering_agreement,
    collapse_diagnostics,
    evaluate,
    knn,
    logistic_regression,
    pca_features,
)
from scgraph.io.counts import log1p_cp10k
from scgraph.io.files import check_directory
from scgraph.tracking import Tracker, check_store, flatten, git_commit
from scgraph.train.checkpointer import CheckpointRecord, Pretrained, load_pretrained, resolve_checkpoint

#: The controls, as named in probe.json, MLflow metrics and the printed table.
CONTROLS = {"random_encoder": "random-init encoder, same shape",
            "bag_of_genes": "bag of genes (random gene table)",
            "pca": "PCA-50 of log1p CP10k",
            "logistic_regression": "log1p CP10k (logistic regression)"}
#: Each feature set's scores, as probe.json and MLflow name them.
SCORES = ("accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "knn_accuracy_mean", "knn_accuracy_std",
          "ari", "nmi", "silhouette")
#: What each embedding's collapse diagnostics are called (the expression control has none: it is no embedding).
DIAGNOSTICS = ("effective_rank", "library_size_r2", "n_genes_r2")


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


def export_embeddings(cells: Cells, embeddings: np.ndarray, backbone: str, path: str | Path) -> str:
    """The read cells (all of them, in input order) with ``.obsm["X_scgraph_<backbone>"]``, ready
    for ``sc.pp.neighbors(adata, use_rep=...)``; returns the obsm key."""
    key = f"X_scgraph_{backbone}"
    cells.adata.obsm[key] = embeddings
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cells.adata.write_h5ad(path)
    return key


def run_probe(opts: ProbeConfig) -> dict[str, Any]:
    """The whole probe; returns what it writes to ``OUT/probe.json``. Every check a user can fail
    runs first; the MLflow run then starts, before the cells are embedded, and ends with the work."""
    folder, tag = resolve_checkpoint(opts.checkpoint, opts.mlflow_uri)  # fail on a wrong path before reading any data
    check_directory("--out", opts.out)
    if opts.export:
        check_directory("--export", Path(opts.export).parent)
    command = {k: v for k, v in asdict(opts).items() if k not in ("quiet", "overwrite")} | {
        "checkpoint": str((folder / tag).resolve())}
    if not opts.overwrite:
        _check_outputs(opts, command)
    check_store(opts.mlflow_uri or CheckpointRecord.read(folder, tag).mlflow_uri)  # the store the run will log to
    cells = read_cells(opts.data, opts.organism)
    labels = cells.labels(opts.label_key)
    keep, notes = labelled_cells(labels, opts.label_key)
    pretrained = load_pretrained(opts.checkpoint, opts.mlflow_uri)
    match = match_genes(cells, pretrained.record.vocab, opts.match_genes_by)
    if match.dropped:
        notes.append(f"{match.dropped} of {match.matched + match.dropped} genes are not in the model's vocabulary "
                     "and were dropped")
    counts = match.apply(cells.counts)
    notes += coverage_notes(match, counts)
    longest = int(np.diff(counts.indptr).max(initial=0))
    if (opts.embed_seq_len or 0) > longest:
        notes.append(f"--embed-seq-len {opts.embed_seq_len} is more than the longest cell ({longest} genes): every "
                     "cell shows all its genes")
    y = labels[keep].astype(str)
    facts = {"n_cells": len(keep), "n_classes": len(np.unique(y)), "genes_matched": match.matched,
             "genes_dropped": match.dropped}
    dataset = opts.dataset_name or cells.name
    tracker = _start_tracking(opts, pretrained, dataset, cells, facts)
    try:
        report = _probe(opts, pretrained, cells, counts, keep, y, dataset, facts, notes)
        report["probe_run_id"] = tracker.run_id
        report["command"] = command
        _finish_tracking(tracker, report, Path(opts.out))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    print(format_report(report), flush=True)
    return report


def _check_outputs(opts: ProbeConfig, command: dict[str, Any]) -> None:
    """Refuse to replace another probe's results: an --out whose probe.json another checkpoint or
    other settings wrote (the figures would mix two encoders'), or an existing --export file that
    this same probe did not write. The same command run again replaces its own."""
    previous = Path(opts.out) / "probe.json"
    earlier = json.loads(previous.read_text()).get("command") if previous.is_file() else None
    if previous.is_file() and earlier != command:
        differ = ("written before probes recorded their settings" if earlier is None else "other " + ", ".join(
            sorted(k for k in set(earlier) | set(command) if earlier.get(k) != command.get(k))))
        raise FileExistsError(f"--out {opts.out} holds the results of another probe ({differ}): choose a new --out, "
                              "or --overwrite to replace them")
    if opts.export and Path(opts.export).exists() and earlier != command:
        raise FileExistsError(f"--export {opts.export} exists and this probe did not write it: choose a new path, or "
                              "--overwrite to replace it")


def _probe(opts: ProbeConfig, pretrained: Pretrained, cells: Cells, counts: Any, keep: np.ndarray, y: np.ndarray,
           dataset: str, facts: dict[str, int], notes: list[str]) -> dict[str, Any]:
    """Embed, score the encoder and its controls, draw the figures, export: probe.json's content."""
    run, backbone = pretrained.run, pretrained.run.model.backbone
    progress = not opts.quiet
    protocol = dict(selection=opts.embed_selection, seq_len=opts.embed_seq_len, choice=pretrained.record.choice,
                    batch_size=opts.embed_batch_size, seed=opts.seed, progress=progress)
    embeddings = embed_cells(pretrained.model, run, counts, desc=f"embed ({backbone})", **protocol)
    baseline = embed_cells(random_encoder(run, opts.seed), run, counts[keep], desc="embed (random encoder)",
                           **protocol)
    bag = embed_cells(BagOfGenes(run, opts.seed), run, counts[keep], desc="embed (bag of genes)", **protocol)

    def probe(seed: int) -> LinearProbe:
        return LinearProbe(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
                           standardize=opts.standardize)

    expression = log1p_cp10k(counts[keep])
    features = {"pretrained": (embeddings[keep], probe), "random_encoder": (baseline, probe),
                "bag_of_genes": (bag, probe), "pca": (pca_features(expression, seed=opts.seed), probe),
                "logistic_regression": (expression, logistic_regression)}
    split = dict(repeats=opts.repeats, seed=opts.seed, test_fraction=opts.test_fraction, progress=progress)
    scores, summaries = {}, {}
    for name, (X, linear) in features.items():
        scores[name] = evaluate(linear, X, y, desc=f"probe ({name})", **split)
        dense = X.toarray() if sp.issparse(X) else X
        neighbours = evaluate(knn, dense, y, **split).summary()
        summaries[name] = scores[name].summary() | {f"knn_{k}": v for k, v in neighbours.items()
                                                    if k.startswith("accuracy")} | clustering_agreement(dense, y,
                                                                                                        opts.seed)
        if name != "logistic_regression":  # (the expression itself: no embedding to diagnose)
            summaries[name] |= collapse_diagnostics(X, np.asarray(counts[keep].sum(axis=1)).ravel(),
                                                    np.diff(sp.csr_matrix(counts[keep]).indptr))
    report: dict[str, Any] = summaries["pretrained"] | facts | {
        "controls": {name: summaries[name] | facts for name in CONTROLS},
        "embedding": {"selection": resolved_selection(run.tokenizer, opts.embed_selection),  # seq_len None: all
                      "seq_len": genes_shown(run.tokenizer, opts.embed_selection, opts.embed_seq_len)},
        "repeats": opts.repeats, "test_fraction": opts.test_fraction, "standardize": opts.standardize,
        "accuracy_per_repeat": scores["pretrained"].accuracy, "macro_f1_per_repeat": scores["pretrained"].macro_f1,
        "test_cells_per_class": {str(c): int(n) for c, n in zip(*np.unique(scores["pretrained"].y_true,
                                                                            return_counts=True))},
        "backbone": backbone, "preset": run.model.preset,
        "model": {"hidden": run.model.hidden, "layers": run.model.layers, "seq_len": run.tokenizer.seq_len},
        "dataset": dataset, "label_key": opts.label_key,
        "checkpoint": str(pretrained.path.resolve()), "pretraining_run_id": pretrained.record.mlflow_run_id,
        "notes": notes}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = [str(p) for p in (
        tsne_plot(embeddings[keep], y, out / f"tsne_{backbone}.png", max_cells=opts.tsne_cells, seed=opts.seed,
                  title=f"{backbone} cell embeddings, {dataset} (t-SNE)"),
        confusion_plot(scores["pretrained"].y_true, scores["pretrained"].y_pred, np.unique(y),
                       out / f"confusion_{backbone}.png", title=f"Linear probe on {backbone}, {dataset} (repeat 1)"))]
    if opts.export:
        report["export"] = {"path": str(Path(opts.export).resolve()),
                            "obsm_key": export_embeddings(cells, embeddings, backbone, opts.export)}
    return report


def _start_tracking(opts: ProbeConfig, pretrained: Pretrained, dataset: str, cells: Cells,
                    facts: dict[str, int]) -> Tracker:
    """The probe's run, in the pretraining run's store and experiment unless told otherwise: there
    it is the pretraining run's child (nested under it in the UI)."""
    record, run = pretrained.record, pretrained.run
    source = record.mlflow_run_id
    uri, experiment = opts.mlflow_uri or record.mlflow_uri, opts.experiment or record.experiment or "scgraph"
    params = flatten("", {"run": run.to_dict()}) | facts | {
        f"probe.{k}": v for k, v in asdict(opts).items() if k not in ("quiet", "mlflow_uri", "experiment")}
    tags = {"backbone": run.model.backbone, "preset": run.model.preset, "dataset": dataset,
            "pretraining_run_id": str(source), "checkpoint": str(pretrained.path.resolve()), "git_commit": git_commit()}
    tracker = Tracker()
    same_experiment = source is not None and experiment == record.experiment
    description = (f"Linear probe, kNN and clustering scores of the frozen {run.model.backbone} encoder of "
                   f"pretraining run {source} on {dataset} ({facts['n_cells']:,} cells, {facts['n_classes']} classes, "
                   f"{opts.repeats} repeat(s)), beside a random-init encoder of the same shape, PCA-50 and logistic "
                   "regression on log1p CP10k.")
    tracker.start(uri, experiment, f"probe-{run.model.backbone}-{dataset}", "probe", description, params, tags,
                  parent=source if same_experiment else None)
    tracker.dataset(dataset, hashlib.sha256(np.asarray(cells.adata.obs_names).astype(str).tobytes()).hexdigest()[:12],
                    str(Path(opts.data).resolve()) if "://" not in opts.data else opts.data,
                    {"cells": cells.counts.shape[0], "genes": cells.counts.shape[1], "label_key": opts.label_key},
                    "evaluation")
    return tracker


def _finish_tracking(tracker: Tracker, report: dict[str, Any], out: Path) -> None:
    """Scores as ``probe/`` metrics (the controls as ``probe/<control>/``), probe.json and figures."""
    metrics = {f"probe/{k}": report[k] for k in (*SCORES, *DIAGNOSTICS)}
    for name in CONTROLS:
        metrics |= {f"probe/{name}/{k}": report["controls"][name][k] for k in (*SCORES, *DIAGNOSTICS)
                    if k in report["controls"][name]}
    tracker.metrics(metrics)
    json_path = out / "probe.json"
    json_path.write_text(json.dumps(report, indent=2))
    for path in [json_path, *report["figures"]]:
        tracker.artifact(path)


def _cell(summary: dict[str, Any], metric: str) -> str:
    return f"{100 * summary[f'{metric}_mean']:6.2f} ± {100 * summary[f'{metric}_std']:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The printed table: the pretrained encoder beside every control, and one sentence saying what
    pretraining earned over the random encoder."""
    backbone, model = report["backbone"], report["model"]
    rows = [(f"pretrained {backbone} encoder", report)] + [
        (CONTROLS[name], report["controls"][name]) for name in CONTROLS]
    split = f"{round(100 * (1 - report['test_fraction']))}/{round(100 * report['test_fraction'])}"
    embedding = report.get("embedding", {})
    shown = ("every expressed gene" if embedding.get("selection") == "all" else
             f"their {embedding.get('selection', 'top')} {embedding.get('seq_len', model['seq_len'])} genes")
    lines = [f"Linear probe: {backbone} ({report['preset']}, hidden {model['hidden']}, {model['layers']} layers, "
             f"L {model['seq_len']}) on {report['dataset']}: {report['n_cells']} cells, {report['n_classes']} classes, "
             f"{report['genes_matched']} genes matched ({report['genes_dropped']} dropped), {report['repeats']} "
             f"repeat(s) of a {split} stratified split; cells embedded with {shown}; one linear layer on "
             f"{'z-scored' if report['standardize'] else 'raw'} features",
             f"  {'':36}{'accuracy %':>16}{'macro-F1 %':>16}{'kNN acc %':>16}{'ARI':>7}{'NMI':>7}{'silh.':>7}"]
    lines += [f"  {name:36}{_cell(s, 'accuracy'):>16}{_cell(s, 'macro_f1'):>16}{_cell(s, 'knn_accuracy'):>16}"
              f"{s['ari']:7.3f}{s['nmi']:7.3f}{s['silhouette']:7.3f}" for name, s in rows]
    lines += [f"  note: {note}" for note in report["notes"]]
    if "recall_per_class" in report:  # (a probe.json written before per-type recall, e.g. a reused demo step)
        pca = report["controls"]["pca"]["recall_per_class"]
        hardest = sorted(report["recall_per_class"].items(), key=lambda item: item[1])[:3]
        lines.append("  Hardest cell types for the pretrained encoder (linear-probe recall %, pretrained / PCA-50): "
                     + ", ".join(f"{cls} {100 * r:.0f} / {100 * pca[cls]:.0f}" for cls, r in hardest))
    twin = report["controls"]["random_encoder"]
    if "effective_rank" in report:  # (a probe.json written before the diagnostics)
        lines.append("  Embedding diagnostics, pretrained / random-init: " + diagnostics_text(report, twin))
    gain = 100 * (report["accuracy_mean"] - twin["accuracy_mean"])
    if gain > 0:
        lines.append(f"  Pretraining beats the random encoder by {gain:+.2f} accuracy points.")
    else:
        lines.append(f"  Pretraining does NOT beat the randomly initialised encoder ({gain:+.2f} accuracy points): "
                     "what the probe finds here comes from the architecture and the expression values, not from "
                     "pretraining." + (f" What moved: {what_moved(report, twin)}." if "effective_rank" in report
                                       else ""))
    return "\n".join(lines)


def diagnostics_text(report: dict[str, Any], twin: dict[str, Any]) -> str:
    return (f"effective rank {report['effective_rank']:.1f} / {twin['effective_rank']:.1f}; library size explains "
            f"{100 * report['library_size_r2']:.0f} % / {100 * twin['library_size_r2']:.0f} % of the (z-scored) "
            f"features, genes per cell {100 * report['n_genes_r2']:.0f} % / {100 * twin['n_genes_r2']:.0f} %")


def what_moved(report: dict[str, Any], twin: dict[str, Any]) -> str:
    """Which diagnostic pretraining changed most against the random-init twin, in words: a collapse
    (the rank fell) or an embedding taken over by sequencing depth (its share rose)."""
    moves = {"the effective rank fell": np.log(twin["effective_rank"] / max(report["effective_rank"], 1e-9)),
             "library size took over more of the embedding": 4 * (report["library_size_r2"] - twin["library_size_r2"]),
             "genes per cell took over more of the embedding": 4 * (report["n_genes_r2"] - twin["n_genes_r2"])}
    said = [f"{what}" for what, move in sorted(moves.items(), key=lambda m: -m[1]) if move > 0.1]
    return ", and ".join(said[:2]) if said else "none of rank, library size or genes per cell (see the diagnostics)"


COMMAND = Command(ProbeConfig, run_probe, prog="launchers/probe.py")


def main(argv: Sequence[str] | None = None) -> int:
    """``launchers/probe.py``."""
    return run(COMMAND, argv)
