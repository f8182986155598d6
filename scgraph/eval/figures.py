"""Evaluation figures (PNG, no display): t-SNE of cell embeddings (the paper's Figure 5), the
probe's confusion matrix, and grouped bars for the Table II comparison."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scgraph.plots import plt  # the module that selects the Agg backend

#: matplotlib's warning for a character its font lacks (its code point is group 1).
_GLYPH = re.compile(r"Glyph (\d+) \(.*\) missing from font")


def _colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: str | Path) -> Path:
    """Save and close; characters the font lacks (labels in other scripts) are one warning naming the
    figure, not matplotlib's warning per glyph and per draw."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    missing = sorted({chr(int(m.group(1))) for w in caught if (m := _GLYPH.search(str(w.message)))})
    for w in caught:
        if not _GLYPH.search(str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        warnings.warn(f"{path}: the font has no glyph for {' '.join(missing)}: shown as boxes", stacklevel=3)
    return path


def tsne_plot(embeddings: np.ndarray, labels: np.ndarray, path: str | Path, *, title: str,
              max_cells: int = 2000, seed: int = 0) -> Path:
    """t-SNE of the embeddings, one colour per label. Its cost grows faster than the cells, so at
    most ``max_cells`` (a seeded uniform sample) are drawn, with 500 iterations on one thread: on
    the busy 2-core machine sklearn's default (1,000 iterations, every core) took 50 s for 2,000
    cells, this 12 s, and the picture is the same."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(labels), size=min(max_cells, len(labels)), replace=False))
    points, shown = embeddings[keep], np.asarray(labels)[keep]
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    with threadpool_limits(1):
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, max_iter=500,
                  random_state=seed).fit_transform(points)
    classes = sorted(set(shown.tolist()))
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    for cls, colour in zip(classes, _colours(len(classes))):
        at = shown == cls
        ax.scatter(xy[at, 0], xy[at, 1], s=4, color=colour, label=f"{cls} ({int(at.sum())})", linewidths=0)
    ax.set(title=title, xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8, frameon=False)
    return _save(fig, path)


def confusion_plot(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], path: str | Path, *,
                   title: str) -> Path:
    """Row-normalised confusion matrix (each true class sums to 1), with the cell counts written
    in, so small classes stay readable beside large ones."""
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(y_true, y_pred, labels=list(classes))
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=120)
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=classes, fontsize=8)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                color="white" if fractions[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, path)


def grouped_bar_chart(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      path: str | Path, *, title: str, ylabel: str) -> Path:
    """One group of bars per entry of ``groups``, one bar per series (name -> (means, stds), NaN
    for a missing value), std as error bars."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(len(series), 1) * 0.5 + 2), 4), dpi=120)
    for k, ((name, (means, stds)), colour) in enumerate(zip(series.items(), _colours(len(series)))):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name,
               color=colour)
    ax.set_xticks(x, labels=groups)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, path)
