"""Cell-embedding quality on held-out cells: both backbones, both training recipes, against the
random-init encoder, PCA-50 and logistic regression, under one probe and one embedding protocol.

    python benchmarks/bench_quality.py --out runs/bench_quality          # about two hours on 2 cores
    python benchmarks/bench_quality.py --sections seeds --seeds 0 1 2   # the targets over three seeds

For each real labelled set (CBMC, pbmc68k_reduced, Zeisel at census density) a seeded share of the
cells is held out; the rest is sharded with the sharding tool and pretrained with
``launchers/pretrain.py`` (one process, the same steps, size and batch for every model: a fixed
CPU budget); the held-out cells are probed
with ``launchers/probe.py``'s code (linear probe, kNN, k-means ARI/NMI, silhouette, and its three
controls). Also: a learning curve (probe accuracy of the checkpoints along the ``cell`` recipe's
run), an ablation of the objectives (CBMC, Transformer), of how training picks genes (both sets,
both backbones), of the inference protocol (top / random / all genes) on the final encoders, and
the grid of how training picks genes x training L x inference protocol, and both backbones over
several seeds (``--seeds``: each its own held-out cells). Writes quality.md,
quality.json and learning_curve.png to --out; the tables go into benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scgraph.cli import write_config_file
from scgraph.config import SELECTIONS, ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.datasets import LabelledCounts, load_cbmc, load_pbmc68k_reduced, load_zeisel
from scgraph.data.shards import ShardSet
from scgraph.demo import DemoConfig
from scgraph.eval.config import ProbeConfig
from scgraph.eval.evaluate import CONTROLS, run_probe, what_moved
from scgraph.plots import line_plot
from scgraph.train.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
#: loader, held-out cells. Zeisel is at census density (2,341 expressed genes per cell, median).
DATASETS = {"cbmc": (load_cbmc, 2000), "pbmc68k_reduced": (load_pbmc68k_reduced, 300), "zeisel": (load_zeisel, 1000)}
#: The demo's model size and budget (``make demo``'s defaults): what a 2-core machine pretrains in minutes.
DEMO = DemoConfig()
SHAPE = dict(preset=DEMO.preset, hidden=DEMO.hidden, layers=DEMO.layers, heads=DEMO.heads,
             adjacency_rank=DEMO.adjacency_rank)
SEQ_LEN, BATCH = DEMO.seq_len, DEMO.batch_size
#: Ablations on CBMC with the Transformer: (tag, label, overrides of any ModelConfig, TokenizerConfig
#: or TrainConfig field; ``max_steps`` as a multiple of --steps). The objectives, then what more
#: capacity, budget or a lighter mask buys (none closed the gap to PCA-50: see RESULTS.md).
ABLATIONS = [("mvp", "objective mvp (cell schedule)", dict(objectives="mvp")),
             ("gepc", "objective gepc", dict(objectives="gepc")),
             ("mvp_recon", "objectives mvp + recon", dict(objectives="mvp,recon")),
             ("h256", "hidden 256 (4x the compute of a step)", dict(hidden=256)),
             ("steps2x", "twice the steps", dict(max_steps=2)),
             ("symmetric", "preset symmetric (mean of the final states, pre-norm, MLP 4x)", dict(preset="symmetric")),
             ("mask05", "mask ratio 0.05 (0.15 by default)", dict(mask_ratio=0.05)),
             ("mask30", "mask ratio 0.3", dict(mask_ratio=0.3)),
             ("mask50", "mask ratio 0.5", dict(mask_ratio=0.5)),
             ("dropout01", "dropout 0.1 (0 by default)", dict(dropout=0.1)),
             ("wd01", "weight decay 0.1 (0.01 by default)", dict(weight_decay=0.1)),
             ("bins", "values binned per cell, scGPT-style (51 bins, bin embedding)",
              dict(value_encoder="bins", n_bins=51))]
#: How pretraining picks a cell's L genes; the default's models are the main tables'.
DEFAULT_SELECTION = TokenizerConfig().selection
GRID_SELECTIONS = (DEFAULT_SELECTION, *(s for s in SELECTIONS if s != DEFAULT_SELECTION))
#: Variable-gene restrictions tried beside the selections (on sets with more genes than that).
HVG = (1000,)
#: The gene-choice grid (CBMC, Transformer): how training picks genes x the training L, each frozen
#: encoder embedded with every inference protocol (selection, genes; None: the training L).
GRID_TRAIN_LENS = (SEQ_LEN, 2 * SEQ_LEN)
GRID_EMBED = [("top", SEQ_LEN), ("top", 2 * SEQ_LEN), ("random", None), ("all", None)]
SECTIONS = ("main", "seeds", "selection", "grid", "ablations")
SCORES = [("accuracy_mean", "linear"), ("knn_accuracy_mean", "kNN"), ("ari", "ARI"), ("nmi", "NMI")]


def prepare(name: str, root: Path, seed: int) -> tuple[Path, Path]:
    """(shards of the pretraining cells, an .h5ad of the held-out cells with ``cell_type``)."""
    loader, held = DATASETS[name]
    data: LabelledCounts = loader()
    held_out = np.zeros(len(data.labels), dtype=bool)
    held_out[np.random.default_rng(seed).choice(len(data.labels), held, replace=False)] = True
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    var = pd.DataFrame(index=data.gene_ids)
    for split, rows in (("pretrain", ~held_out), ("heldout", held_out)):
        obs = pd.DataFrame({"cell_type": pd.Categorical(data.labels[rows])},
                           index=[f"{name}{i}" for i in np.flatnonzero(rows)])
        ad.AnnData(X=data.counts[rows], obs=obs, var=var).write_h5ad(folder / f"{split}.h5ad")
    shards = folder / "shards"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "sharding", "write", "--quiet", "--h5ad", str(folder / "pretrain.h5ad"),
                        "--out", str(shards), "--cells-per-shard", "1000"], check=True, cwd=ROOT)
    return shards, folder / "heldout.h5ad"


def pretrain(shards: Path, out: Path, store: str, backbone: str, recipe: str, steps: int, seed: int,
             every: int, seq_len: int = SEQ_LEN, **overrides) -> Path:
    """One model through ``launchers/pretrain.py`` (reused when it finished before); ``overrides``
    are fields of ModelConfig, TokenizerConfig, TrainConfig or PretrainConfig (e.g.
    ``group_by_length``), ``max_steps`` a multiple of ``steps``."""
    if (out / "final_checkpoint.json").is_file():
        return out
    part = {kind: {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(kind)}}
            for kind in (ModelConfig, TokenizerConfig, TrainConfig, PretrainConfig)}
    unknown = set(overrides).difference(*part.values())
    if unknown:
        raise ValueError(f"not a model, tokenizer, training or pretraining setting: {', '.join(sorted(unknown))}")
    train = part[TrainConfig] | dict(max_steps=steps * part[TrainConfig].get("max_steps", 1))
    run = RunConfig(model=ModelConfig(backbone=backbone, **(SHAPE | part[ModelConfig])),
                    tokenizer=TokenizerConfig(seq_len=seq_len, **part[TokenizerConfig]),
                    train=TrainConfig(recipe=recipe, batch_size=BATCH, seed=seed, **train))
    cfg = PretrainConfig(run=run, shards=str(shards), output=str(out), checkpoint_every=every, mlflow_uri=store,
                         experiment="bench-quality", run_name=out.name, system_metrics=False, **part[PretrainConfig])
    started = time.time()
    config = write_config_file(cfg, out.parent / "configs" / f"{out.name}.yaml")
    subprocess.run([sys.executable, "launchers/pretrain.py", "--config", str(config)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    print(f"  pretrained {out.name} in {time.time() - started:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def probe(checkpoint: Path, cells: Path, dataset: str, root: Path, store: str, seed: int,
          selection: str = "top", seq_len: int | None = None) -> dict:
    """probe.json of one checkpoint on the held-out cells embedded with ``selection`` and ``seq_len``
    genes (None: the training L); reused when the same protocol was probed before."""
    out = root / "probe" / (checkpoint.name if (selection, seq_len) == ("top", None) else
                            f"{checkpoint.name}-{selection}{seq_len or ''}")
    report = out / "probe.json"
    if not report.is_file():
        cfg = ProbeConfig(checkpoint=str(checkpoint), data=str(cells), dataset_name=dataset, out=str(out),
                          mlflow_uri=store, experiment="bench-quality-probes", seed=seed, embed_selection=selection,
                          embed_seq_len=seq_len, tsne_cells=500, quiet=True)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run_probe(cfg)
    return json.loads(report.read_text())


def score_row(label: str, scores: dict) -> str:
    return f"| {label} | " + " | ".join(f"{100 * scores[k]:.1f}" for k, _ in SCORES) + " |"


def recall_table(name: str, rows: dict) -> list[str]:
    """Linear-probe recall of each cell type (cell recipe models and the controls): which types an
    embedding loses, where accuracy only counts cells."""
    first = rows[f"{name}-transformer-cell"]
    columns = {backbone: rows[f"{name}-{backbone}-cell"] for backbone in ("transformer", "gnn", "gnn_linear")}
    columns |= {"random-init (TF)": first["controls"]["random_encoder"], "PCA-50": first["controls"]["pca"],
                "LR": first["controls"]["logistic_regression"]}
    counts = first["test_cells_per_class"]
    lines = [f"Recall per cell type ({name}, linear probe %, mean of the splits; test cells per split):", "",
             "| cell type | test cells | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for cls in sorted(first["recall_per_class"], key=lambda c: -counts[c]):
        lines.append(f"| {cls} | {counts[cls]} | "
                     + " | ".join(f"{100 * c['recall_per_class'][cls]:.0f}" for c in columns.values()) + " |")
    return lines


def target_line(label: str, report: dict) -> str:
    """One encoder against the targets: >= 0.95 x logistic regression, >= 60 % of the random-init
    twin's gap to it removed, never below the twin; the distance to PCA-50 reported."""
    controls = report["controls"]
    acc, rand = report["accuracy_mean"], controls["random_encoder"]["accuracy_mean"]
    lr, pca = controls["logistic_regression"]["accuracy_mean"], controls["pca"]["accuracy_mean"]
    knn_gap = report["knn_accuracy_mean"] - controls["pca"]["knn_accuracy_mean"]
    return (f"- {label}: {100 * acc:.1f} % = {acc / lr:.3f} x LR (target >= 0.95); removes "
            f"{(acc - rand) / max(lr - rand, 1e-9):.2f} of the random-init twin's gap to LR (target >= 0.6); "
            f"{100 * (acc - rand):+.1f} points over the twin (target > 0); against PCA-50 {100 * (acc - pca):+.1f} "
            f"(kNN {100 * knn_gap:+.1f}) points; bag of genes {100 * controls['bag_of_genes']['accuracy_mean']:.1f} %")


def model_tag(selection: str) -> str:
    """The tag part of a cell-recipe model trained with ``selection``: ``cell`` for the default."""
    return "cell" if selection == DEFAULT_SELECTION else selection


def training_genes(name: str, shards: Path, cells: Path, root: Path, store: str, steps: int, seed: int,
                   results: dict) -> list[str]:
    """Every training selection (and the 1,000 most variable genes, where the set has more) for both
    backbones on one dataset (cell recipe), embedded as trained and with the top-L genes: what the
    selection buys, and what a mismatch between training and inference costs."""
    lines = [f"### Training genes ({name}, cell recipe; linear probe %, embedded as trained / with the top L)", "",
             "| encoder | as trained | top L | random-init twin | bag of genes | eff. rank (twin) |",
             "|---|---:|---:|---:|---:|---:|"]
    vocab = len(ShardSet.open(str(shards)).feature_ids)
    choices = [(selection, {}) for selection in GRID_SELECTIONS]
    choices += [(f"top of {n} variable genes", {"hvg_genes": n}) for n in HVG if n < vocab]
    for backbone in ("transformer", "gnn"):
        for selection, extra in choices:
            tag = f"{name}-{backbone}-{model_tag(selection) if not extra else 'hvg' + str(extra['hvg_genes'])}"
            overrides = {"selection": "top" if extra else selection, **extra}
            out = pretrain(shards, root / "pretrain" / tag, store, backbone, "cell", steps, seed, steps, **overrides)
            trained, top = probe(out, cells, name, root, store, seed), probe(out, cells, name, root, store, seed, "top")
            results.setdefault("training_genes", {})[tag] = {"as_trained": trained, "top": top}
            twin = trained["controls"]["random_encoder"]
            default = " (default)" if selection == DEFAULT_SELECTION and not extra else ""
            lines.append(f"| {backbone}, {selection}{default} | {100 * trained['accuracy_mean']:.1f} | "
                         f"{100 * top['accuracy_mean']:.1f} | {100 * twin['accuracy_mean']:.1f} | "
                         f"{100 * trained['controls']['bag_of_genes']['accuracy_mean']:.1f} | "
                         f"{trained['effective_rank']:.1f} ({twin['effective_rank']:.1f}) |")
    return lines + [""]


#: The robustness grid on the census-density set: a fractional design over hidden {128, 256}, layers
#: {2, 4, 6}, L {128, 256, 512}, steps {600, 1800} and lr {1e-3, 3e-3}: one row per level away from
#: the demo's setting (the first row), each larger setting at 600 steps so the grid fits a 2-core
#: machine in about an hour. The second row is the setting where the Transformer once fell 11.5
#: points below its twin. L = every expressed gene (4,096 is above any Zeisel cell's count) is
#: trained with the linear GNN alone, the one backbone whose cost stays linear in L, and its first
#: row is the demo's L = 128 with the same backbone and budget. A pretrained encoder must never
#: lose to its random-init twin.
BACKBONES = ("transformer", "gnn")
GRID = [dict(hidden=128, layers=2, seq_len=128, max_steps=1800, lr=3e-3),
        dict(hidden=128, layers=4, seq_len=256, max_steps=600, lr=1e-3),
        dict(hidden=256, layers=2, seq_len=128, max_steps=600, lr=3e-3),
        dict(hidden=128, layers=6, seq_len=128, max_steps=600, lr=1e-3),
        dict(hidden=128, layers=2, seq_len=512, max_steps=600, lr=3e-3),
        dict(hidden=128, layers=2, seq_len=128, max_steps=600, lr=3e-3, backbones=("gnn_linear",)),
        dict(hidden=128, layers=2, seq_len=4096, max_steps=600, lr=3e-3, backbones=("gnn_linear",))]


def robustness_grid(name: str, shards: Path, cells: Path, root: Path, store: str, seed: int,
                    results: dict) -> list[str]:
    """Each GRID setting, both backbones, default recipe and selection: pretrained vs its twin."""
    lines = [f"### Robustness grid ({name}, default recipe; linear probe %)", "",
             "| setting | backbone | pretrained | random-init twin | gain | eff. rank (twin) | what moved |",
             "|---|---|---:|---:|---:|---:|---|"]
    for setting in GRID:
        setting = dict(setting)
        backbones = setting.pop("backbones", BACKBONES)
        length = "all" if setting["seq_len"] >= 4096 else setting["seq_len"]
        label = f"h{setting['hidden']} x{setting['layers']} L{length} {setting['max_steps']} steps lr {setting['lr']:g}"
        for backbone in backbones:
            tag = f"{name}-grid-{backbone}-" + "-".join(str(v) for v in setting.values())
            model = {k: v for k, v in setting.items() if k not in ("seq_len", "max_steps")}
            out = pretrain(shards, root / "pretrain" / tag, store, backbone, "cell", setting["max_steps"], seed,
                           setting["max_steps"], seq_len=setting["seq_len"], **model)
            report = probe(out, cells, name, root, store, seed)
            twin = report["controls"]["random_encoder"]
            results.setdefault("grid", {})[tag] = report
            gain = report["accuracy_mean"] - twin["accuracy_mean"]
            lines.append(f"| {label} | {backbone} | {100 * report['accuracy_mean']:.1f} | "
                         f"{100 * twin['accuracy_mean']:.1f} | {100 * gain:+.1f} | {report['effective_rank']:.1f} "
                         f"({twin['effective_rank']:.1f}) | {what_moved(report, twin) if gain <= 0 else ''} |")
    return lines + [""]


def gene_choice_grid(shards: Path, cells: Path, root: Path, store: str, steps: int, seed: int,
                     results: dict) -> list[str]:
    """Training choice x training L x inference protocol (CBMC, Transformer, cell recipe): linear
    probe accuracy of each frozen encoder, and of the random-init encoder embedded the same way."""
    columns = [f"{selection} {length or 'L'}" if selection != "all" else "all" for selection, length in GRID_EMBED]
    lines = ["### Gene choice: training x inference x L (CBMC, Transformer, cell recipe, linear probe %)", "",
             "Rows: how pretraining picked each cell's genes and how many (L); columns: which genes the frozen "
             "encoder sees (top-n by expression, n random ones, or all expressed; L: the training L).", "",
             "| training | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    random_rows: dict[int, list[float]] = {}
    grid = results.setdefault("gene_choice_grid", {})
    for length in GRID_TRAIN_LENS:
        for selection in GRID_SELECTIONS:
            # the L = 128 models are the main table's and the training-genes table's; L = 256 ones are new
            short = model_tag(selection) if length == SEQ_LEN else f"{selection}-L{length}"
            tag = f"cbmc-transformer-{short}"
            out = pretrain(shards, root / "pretrain" / tag, store, "transformer", "cell", steps, seed, steps,
                           seq_len=length, selection=selection)
            accuracies, controls = [], []
            for how, n in GRID_EMBED:
                report = probe(out, cells, "cbmc", root, store, seed, how, None if n == length else n)
                grid[f"{selection} L{length} -> {how} {n or 'L'}"] = report
                accuracies.append(report["accuracy_mean"])
                controls.append(report["controls"]["random_encoder"]["accuracy_mean"])
            random_rows[length] = controls
            lines.append(f"| {selection} L{length} | " + " | ".join(f"{100 * a:.1f}" for a in accuracies) + " |")
    for length, controls in random_rows.items():
        lines.append(f"| random-init, embedded as L{length} | " + " | ".join(f"{100 * a:.1f}" for a in controls) + " |")
    return lines + [""]


def seed_root(root: Path, seeds: list[int], seed: int) -> Path:
    """Where one seed's split, models and probes live: ``root`` for the first seed (every section's
    seed), ``root/seed<N>`` for the others."""
    return root if seed == seeds[0] else root / f"seed{seed}"


def over_seeds(name: str, first: tuple[Path, Path], seeds: list[int], root: Path, store: str, steps: int,
               results: dict) -> list[str]:
    """Both backbones (cell recipe) on one set with every seed (each its own held-out cells,
    initialisation, data order and probe splits), and the targets judged on the seeds' mean: on
    pbmc68k_reduced's ~400 training cells one seed's probe moves by 2-3 points with the seed alone.
    ``first``: the first seed's (shards, held-out cells), prepared already."""
    lines = [f"### Over seeds: {name} (cell recipe, linear probe %)", "",
             "| encoder | seed | pretrained | random-init twin | logistic regression | x LR | twin's gap removed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    means, targets = {}, []
    data = {seed: first if seed == seeds[0] else prepare(name, seed_root(root, seeds, seed), seed) for seed in seeds}
    for backbone in ("transformer", "gnn"):
        scores = []
        for seed in seeds:
            here, (shards, cells) = seed_root(root, seeds, seed), data[seed]
            tag = f"{name}-{backbone}-cell"
            report = probe(pretrain(shards, here / "pretrain" / tag, store, backbone, "cell", steps, seed, steps // 3),
                           cells, name, here, store, seed)
            results.setdefault("seeds", {}).setdefault(name, {})[f"{backbone}-{seed}"] = report
            controls = report["controls"]
            scores.append((report["accuracy_mean"], controls["random_encoder"]["accuracy_mean"],
                           controls["logistic_regression"]["accuracy_mean"]))
        rows = [(str(seed), *score) for seed, score in zip(seeds, scores)]
        means[backbone] = tuple(float(np.mean(column)) for column in zip(*scores))
        for label, acc, twin, lr in [*rows, ("mean", *means[backbone])]:
            lines.append(f"| {backbone} | {label} | {100 * acc:.1f} | {100 * twin:.1f} | {100 * lr:.1f} | "
                         f"{acc / lr:.3f} | {(acc - twin) / max(lr - twin, 1e-9):.2f} |")
        acc, twin, lr = means[backbone]
        worst = min(a - t for a, t, _ in scores)
        targets.append(f"- {backbone}, mean of {len(seeds)} seed(s): {acc / lr:.3f} x LR (target >= 0.95); removes "
                       f"{(acc - twin) / max(lr - twin, 1e-9):.2f} of the twin's gap (target >= 0.6); the closest "
                       f"seed {100 * worst:+.1f} points over its twin (target > 0)")
    targets.append(f"- GNN - Transformer, means: {100 * (means['gnn'][0] - means['transformer'][0]):+.1f} points "
                   "(target within 2)")
    return [*lines, "", *targets, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    parser.add_argument("--steps", type=int, default=DEMO.steps, help="pretraining steps of every model "
                        "(default: the demo's)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="main: every backbone and recipe beside the controls; seeds: both backbones with every "
                             "--seeds, the targets on their mean; ablations: the CBMC ablations, the "
                             "inference protocols and the gene-choice grid; selection: every training selection on "
                             "each set; grid: the robustness grid on the census-density set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the held-out split, pretraining and probe: every section uses the first; "
                             "seeds repeats both backbones with each and judges the targets on their mean")
    args = parser.parse_args()
    root, steps, seeds = args.out.resolve(), args.steps, args.seeds
    seed = seeds[0]
    store = f"sqlite:///{root / 'mlflow.db'}"
    root.mkdir(parents=True, exist_ok=True)
    started, load = time.time(), os.getloadavg()[0]
    results: dict = {"steps": steps, "shape": SHAPE, "seq_len": SEQ_LEN, "batch": BATCH, "datasets": {}}
    header = "| encoder | " + " | ".join(n for _, n in SCORES) + " |\n|---|" + "---:|" * len(SCORES)
    lines = [f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU; load {load:.1f} at the start. Every model: "
             f"{SHAPE}, L = {SEQ_LEN}, batch {BATCH}, {steps} steps, one process. Scores in % on held-out cells "
             "(linear probe and kNN: mean of 5 stratified 70/30 splits; ARI/NMI of k-means with as many clusters "
             "as labels). Embedding protocol: as trained (its selection and L), unless a table says not.", ""]
    curve: dict[str, tuple[list[int], list[float]]] = {}
    prepared: dict[str, tuple[Path, Path]] = {}  # each dataset loaded, split and sharded once
    for name in args.datasets:
        prepared[name] = prepare(name, root, seed)
    for name in args.datasets if "main" in args.sections else ():
        shards, cells = prepared[name]
        table = [f"### {name}", "", header]
        rows: dict = {}
        for recipe in ("cell", "paper"):
            for backbone in ("transformer", "gnn", "gnn_linear") if recipe == "cell" else ("transformer", "gnn"):
                tag = f"{name}-{backbone}-{recipe}"
                out = pretrain(shards, root / "pretrain" / tag, store, backbone, recipe, steps, seed, steps // 3)
                report = probe(out, cells, name, root, store, seed)
                rows[tag] = report
                table.append(score_row(f"{backbone}, recipe {recipe}", report))
                if recipe == "cell" and name == "cbmc":
                    points = sorted((out / "checkpoints").glob("step*"))
                    xs, ys = [0], [report["controls"]["random_encoder"]["accuracy_mean"]]
                    for point in points:
                        step = int(point.name.removeprefix("step"))
                        if point.is_dir() and step % (steps // 3) == 0:
                            at = probe(point, cells, name, root / "curve" / tag, store, seed)
                            xs.append(step)
                            ys.append(at["accuracy_mean"])
                    curve[backbone] = (xs, ys)
        first = rows[f"{name}-transformer-cell"]["controls"]
        for control, text in CONTROLS.items():
            table.append(score_row(text, first[control]) if control != "random_encoder" else
                         score_row(f"{text} (Transformer)", first[control]))
        for backbone in ("gnn", "gnn_linear"):
            table.append(score_row(f"{CONTROLS['random_encoder']} ({backbone})", rows[f"{name}-{backbone}-cell"]
                                   ["controls"]["random_encoder"]))
        table += ["", "Targets (cell recipe, linear probe; kNN beside it):", ""]
        for backbone in ("transformer", "gnn", "gnn_linear"):
            table.append(target_line(backbone, rows[f"{name}-{backbone}-cell"]))
        gap = rows[f"{name}-gnn-cell"]["accuracy_mean"] - rows[f"{name}-transformer-cell"]["accuracy_mean"]
        table.append(f"- GNN - Transformer: {100 * gap:+.1f} points (target within 2)")
        table += ["", *recall_table(name, rows)]
        results["datasets"][name] = rows
        lines += table + [""]
    if curve:
        line_plot(curve, root / "learning_curve.png", title="CBMC held out: linear probe vs pretraining step",
                  xlabel="pretraining step (0 = random init)", ylabel="probe accuracy")
        lines += ["### Learning curve (CBMC, recipe cell, linear probe accuracy %)", "",
                  "| step | " + " | ".join(curve) + " |", "|---:|" + "---:|" * len(curve)]
        for i, step in enumerate(next(iter(curve.values()))[0]):
            lines.append(f"| {step} | " + " | ".join(f"{100 * ys[i]:.1f}" for _, ys in curve.values()) + " |")
        results["learning_curve"] = curve
        lines.append("")
    if "seeds" in args.sections:
        for name in args.datasets:
            lines += over_seeds(name, prepared[name], seeds, root, store, steps, results)
    if "selection" in args.sections:
        for name in args.datasets:
            lines += training_genes(name, *prepared[name], root, store, steps, seed, results)
    if "grid" in args.sections and "zeisel" in args.datasets:
        lines += robustness_grid("zeisel", *prepared["zeisel"], root, store, seed, results)
    if "ablations" in args.sections and "cbmc" in args.datasets:
        shards, cells = prepared["cbmc"]
        lines += ["### Ablations (CBMC, Transformer, cell recipe unless named)", "", header]
        lines.append(score_row("recipe cell (recon)", results["datasets"]["cbmc"]["cbmc-transformer-cell"]))
        for short, label, overrides in ABLATIONS:
            tag = f"cbmc-transformer-{short}"
            out = pretrain(shards, root / "pretrain" / tag, store, "transformer", "cell", steps, seed, steps,
                           **overrides)
            report = probe(out, cells, "cbmc", root, store, seed)
            results.setdefault("ablations", {})[label] = report
            lines.append(score_row(label, report))
        lines.append("")
        lines += ["### Which genes the frozen encoder sees (CBMC, recipe cell)", "", header]
        for backbone in ("transformer", "gnn"):
            out = root / "pretrain" / f"cbmc-{backbone}-cell"
            for selection in ("top", "random", "all"):
                report = probe(out, cells, "cbmc", root, store, seed, selection)
                lines.append(score_row(f"{backbone}, {selection} genes", report))
                lines.append(score_row(f"random-init {backbone}, {selection} genes",
                                       report["controls"]["random_encoder"]))
        lines.append("")
        lines += gene_choice_grid(shards, cells, root, store, steps, seed, results)
    lines.append(f"{time.time() - started:.0f} s in all; load {os.getloadavg()[0]:.1f} at the end.")
    text = "\n".join(lines)
    print(text)
    (root / "quality.md").write_text(text + "\n")
    (root / "quality.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
