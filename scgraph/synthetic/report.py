"""Table I and Figure 3 from a study's results: the printed table, table1.csv and the PNGs."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: the study runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from scgraph.synthetic.bounds import Floors  # noqa: E402
from scgraph.synthetic.calibration import PAPER_ROW_AVERAGES  # noqa: E402
from scgraph.synthetic.train import BACKBONE_LABELS, Curve  # noqa: E402

CSV_COLUMNS = ("beta", "sigma", "tf_loss", "gnn_loss", "ratio", "tf_loss_std", "gnn_loss_std", "ratio_std")
FLOOR_COLUMNS = ("beta", "sigma", "order_and_values", "static_adjacency", "token_weights", "order_only", "ratio")
#: The paper's colours in Figure 3: Transformer red, GNN green.
COLOURS = {"transformer": "tab:red", "gnn": "tab:green"}
#: The floor each model can approach (``scgraph.synthetic.bounds``).
FLOOR_OF = {"transformer": lambda f: f.order_and_values, "gnn": lambda f: f.static_adjacency}


@dataclass
class SettingResult:
    """Both models' test curves at one (beta, sigma), one curve per repeat."""

    beta: float
    sigma: float
    curves: dict[str, list[Curve]] = field(default_factory=dict)

    def loss(self, backbone: str) -> float:
        """Best test MSE, averaged over repeats."""
        return float(np.mean([c.best for c in self.curves[backbone]]))

    def loss_std(self, backbone: str) -> float:
        """Standard deviation of the best test MSE over repeats (0 for one repeat)."""
        return _std([c.best for c in self.curves[backbone]])

    @property
    def ratio(self) -> float:
        """GNN / TF of the averaged losses: above 1 means the Transformer is better."""
        return self.loss("gnn") / self.loss("transformer")

    @property
    def ratio_std(self) -> float:
        """Spread of the per-repeat ratios (both models of a repeat share its dataset)."""
        pairs = zip(self.curves["gnn"], self.curves["transformer"])
        return _std([gnn.best / tf.best for gnn, tf in pairs])

    def row(self) -> dict[str, float]:
        return {"beta": self.beta, "sigma": self.sigma, "tf_loss": self.loss("transformer"),
                "gnn_loss": self.loss("gnn"), "ratio": self.ratio, "tf_loss_std": self.loss_std("transformer"),
                "gnn_loss_std": self.loss_std("gnn"), "ratio_std": self.ratio_std}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def grid(results: list[SettingResult]) -> tuple[list[float], list[float]]:
    """The betas and sigmas present, sorted."""
    return sorted({r.beta for r in results}), sorted({r.sigma for r in results})


def ratio_average(results: list[SettingResult], beta: float) -> float:
    """The paper's Avg column: the ratio averaged over sigma at one beta."""
    ratios = [r.ratio for r in results if r.beta == beta]
    return sum(ratios) / len(ratios)


def _floor_row(f: Floors) -> dict[str, float]:
    return {"beta": f.beta, "sigma": f.sigma, "order_and_values": f.order_and_values,
            "static_adjacency": f.static_adjacency, "token_weights": f.token_weights, "order_only": f.order_only,
            "ratio": f.ratio}


def write_csv(results: list[SettingResult], path: Path) -> None:
    """table1.csv: one row per setting."""
    _write_rows([r.row() for r in sorted(results, key=lambda r: (r.beta, r.sigma))], CSV_COLUMNS, path)


def write_floors_csv(bounds: list[Floors], path: Path) -> None:
    """floors.csv: the error floors of every setting (``scgraph.synthetic.bounds``)."""
    _write_rows([_floor_row(f) for f in sorted(bounds, key=lambda f: (f.beta, f.sigma))], FLOOR_COLUMNS, path)


def _write_rows(rows: list[dict[str, float]], columns: tuple[str, ...], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" for k, v in row.items()} for row in rows)


def format_floors(bounds: list[Floors]) -> str:
    """The floors beside Table I, in its layout: per beta the best possible MSE with positional
    weights on the values (attention), with a static adjacency, with token weights and the whole
    order known, from the order alone, and the ratio of the first two (GNN/TF for models at their
    floors); sigma across."""
    sigmas = sorted({f.sigma for f in bounds})
    by_key = {(f.beta, f.sigma): f for f in bounds}
    header = f"{'beta':>5} {'':>10} " + " ".join(f"{'s=' + f'{s:g}':>7}" for s in sigmas)
    lines = ["Error floors (best linear predictors, scgraph/synthetic/bounds.py)", header, "-" * len(header)]
    rows = (("positional", lambda f: f.order_and_values), ("static", lambda f: f.static_adjacency),
            ("token+ord", lambda f: f.token_weights),
            ("order", lambda f: f.order_only), ("ratio", lambda f: f.ratio))
    for beta in sorted({f.beta for f in bounds}):
        for i, (label, value) in enumerate(rows):
            row = " ".join(f"{value(by_key[(beta, s)]):7.4f}" if (beta, s) in by_key else f"{'-':>7}"
                           for s in sigmas)
            lines.append(f"{f'{beta:g}' if i == 0 else '':>5} {label:>10} {row}")
    return "\n".join(lines)


def format_table(results: list[SettingResult], title: str) -> str:
    """Table I in the paper's layout: per beta a TF, a GNN and a ratio line, each cell mean ± std
    over repeats (the mean alone for one repeat); sigma across; the ratio averaged over sigma, and
    the paper's average at that beta, in the last columns. A setting not (yet) run shows as '-'."""
    betas, sigmas = grid(results)
    by_key = {(r.beta, r.sigma): r for r in results}
    repeated = any(len(curves) > 1 for r in results for curves in r.curves.values())
    width = 15 if repeated else 7
    header = (f"{'beta':>5} {'':>5} " + " ".join(f"{'s=' + f'{s:g}':>{width}}" for s in sigmas)
              + f" {'Avg':>7} {'Paper':>7}")
    lines = [title, header, "-" * len(header)]
    for beta in betas:
        cells = [by_key.get((beta, s)) for s in sigmas]
        for label, mean, std in (("TF", lambda r: r.loss("transformer"), lambda r: r.loss_std("transformer")),
                                 ("GNN", lambda r: r.loss("gnn"), lambda r: r.loss_std("gnn")),
                                 ("ratio", lambda r: r.ratio, lambda r: r.ratio_std)):
            row = " ".join(f"{f'{mean(c):.4f}' + (f'±{std(c):.4f}' if repeated else ''):>{width}}" if c
                           else f"{'-':>{width}}" for c in cells)
            avg = paper = f"{'':>7}"
            if label == "ratio":
                avg = f"{ratio_average(results, beta):7.3f}"
                if beta in PAPER_ROW_AVERAGES:
                    paper = f"{PAPER_ROW_AVERAGES[beta]:7.3f}"
            lines.append(f"{f'{beta:g}' if label == 'TF' else '':>5} {label:>5} {row} {avg} {paper}")
    return "\n".join(lines)


def plot_best_loss_vs_beta(results: list[SettingResult], path: Path, bounds: Sequence[Floors] = ()) -> None:
    """Figure 3(a): best test loss against beta (mean, error bars one std over repeats), one panel
    per sigma, one line per model; with ``bounds``, each model's error floor dashed in its colour
    (positional weights for the Transformer, a static adjacency for the GNN)."""
    betas, sigmas = grid(results)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(3.2 * len(sigmas), 3.0), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        cells = sorted((r for r in results if r.sigma == sigma), key=lambda r: r.beta)
        for backbone, label in BACKBONE_LABELS.items():
            ax.errorbar([r.beta for r in cells], [r.loss(backbone) for r in cells],
                        yerr=[r.loss_std(backbone) for r in cells], fmt="o-", capsize=3,
                        color=COLOURS[backbone], label=label)
            floor = sorted((f for f in bounds if f.sigma == sigma), key=lambda f: f.beta)
            if floor:
                ax.plot([f.beta for f in floor], [FLOOR_OF[backbone](f) for f in floor], "--",
                        color=COLOURS[backbone], label=f"{label} floor")
        ax.set(title=f"sigma = {sigma:g}", xlabel="beta", xticks=betas)
    axes[0][0].set_ylabel("best test MSE")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: list[SettingResult], path: Path) -> None:
    """Figure 3(b): test-loss curves at the smallest and largest beta (0 and 0.5 on the paper's
    grid), at the smallest sigma, first repeat."""
    betas, sigmas = grid(results)
    by_key = {(r.beta, r.sigma): r for r in results}
    ends = [b for b in dict.fromkeys((betas[0], betas[-1])) if (b, sigmas[0]) in by_key]
    fig, axes = plt.subplots(1, len(ends), figsize=(4.5 * len(ends), 3.2), squeeze=False)
    for ax, beta in zip(axes[0], ends):
        for backbone, label in BACKBONE_LABELS.items():
            losses = by_key[(beta, sigmas[0])].curves[backbone][0].test_losses
            ax.plot(range(1, len(losses) + 1), losses, color=COLOURS[backbone], label=label)
        ax.set(title=f"beta = {beta:g}, sigma = {sigmas[0]:g}", xlabel="epoch", ylabel="test MSE",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
