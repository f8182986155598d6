"""The paper's linear probe as a scikit-learn classifier, its repeated
evaluation, and the expression-only control.

The encoder is frozen, so the probe sees only fixed cell embeddings: one linear layer trained as a
cell-type classifier with Adam (lr 0.005), batch 64, 50 epochs, on a 70/30 stratified split,
repeated with different seeds; accuracy and macro-F1 are reported as mean ± std over the repeats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm


class Classifier(Protocol):
    def fit(self, X: Any, y: np.ndarray) -> Any: ...

    def predict(self, X: Any) -> np.ndarray: ...


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """A 64-cell batch through one small linear layer is too little work to split across threads;
    on a busy 2-core machine, OpenMP threads waiting on each other made a fit over 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """One linear layer on frozen features, trained with softmax cross-entropy: a scikit-learn
    classifier (``fit``/``predict``/``score``, ``clone``, pipelines, ``cross_val_score``).

    Defaults are the paper's: 50 epochs, batch 64, Adam with lr 0.005. ``seed`` fixes the layer's
    initialisation and the batch order, so a probe is reproducible. Written on torch rather than
    taken from scikit-learn because the paper's probe is this optimiser and schedule, not a solver
    run to convergence (that is the logistic-regression control beside it).

    ``standardize`` z-scores each feature with the training cells' mean and std first (as MAE's
    linear probe puts a BatchNorm without affine parameters before its classifier). The model is
    still one linear map of the embedding; only the optimisation changes. It matters here: a CLS
    output after LayerNorm is mostly a component common to every cell (per-cell std ~0.005 against
    a mean ~1 after a short pretraining), and Adam at lr 0.005 for 50 epochs cannot grow the
    weights enough to read it, so the raw probe falls back to the majority class.
    """

    def __init__(self, epochs: int = 50, batch_size: int = 64, lr: float = 0.005, seed: int = 0,
                 standardize: bool = True) -> None:
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.standardize = standardize

    def fit(self, X: Any, y: Any) -> LinearProbe:
        for name in ("epochs", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has 1 class ({self.classes_.tolist()[0]!r}): a classifier needs at least 2")
        self.mean_, self.scale_ = np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
        if self.standardize:
            std = X.std(axis=0)
            self.mean_, self.scale_ = X.mean(axis=0), np.where(std > 1e-12, std, 1.0).astype(np.float32)
        X = (X - self.mean_) / self.scale_
        features, targets = torch.from_numpy(X), torch.from_numpy(codes.astype(np.int64))
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layer = torch.nn.Linear(X.shape[1], len(self.classes_))
        optimizer = torch.optim.Adam(layer.parameters(), lr=self.lr)
        with _one_thread():
            for _ in range(self.epochs):
                for idx in torch.randperm(len(targets), generator=generator).split(self.batch_size):
                    loss = F.cross_entropy(layer(features[idx]), targets[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.layer_ = layer.eval()
        return self

    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "layer_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        with torch.inference_mode():
            return self.layer_(torch.from_numpy((X - self.mean_) / self.scale_)).numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        """(cells, classes) logits; with two classes, as scikit-learn's binary classifiers, (cells,)
        the second class's logit minus the first's."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict(self, X: Any) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]


def stratified_split(y: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with each class split ``1 - test_fraction : test_fraction``, rounded,
    and at least one cell on each side for every class of two cells or more (scikit-learn's
    stratified splitter may leave a small class out of the test set entirely)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(y).tolist():
        members = rng.permutation(np.flatnonzero(y == cls))
        if len(members) < 2:
            raise ValueError(f"class {cls!r} has {len(members)} cell: a stratified split needs at least 2")
        n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclass
class Scores:
    """One classifier's results over the repeats; ``recall`` holds each repeat's recall of every
    class in ``classes`` (which cell types an embedding loses, where accuracy only says how many
    cells); ``y_true``/``y_pred`` are the first repeat's test set (for the confusion matrix)."""

    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    recall: list[np.ndarray] = field(default_factory=list)
    classes: np.ndarray | None = None
    y_true: np.ndarray | None = None
    y_pred: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        """Mean and sample std (ddof 1; 0 for a single repeat) of accuracy and macro-F1, and each
        class's mean recall over the repeats (``recall_per_class``)."""
        def std(x: list[float]) -> float:
            return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0

        recall = np.mean(self.recall, axis=0)
        return {"accuracy_mean": float(np.mean(self.accuracy)), "accuracy_std": std(self.accuracy),
                "macro_f1_mean": float(np.mean(self.macro_f1)), "macro_f1_std": std(self.macro_f1),
                "recall_per_class": {str(c): float(r) for c, r in zip(self.classes, recall)}}


def evaluate(make: Callable[[int], Classifier], X: Any, y: np.ndarray, *, repeats: int = 5, seed: int = 0,
             test_fraction: float = 0.3, desc: str | None = None, progress: bool = False) -> Scores:
    """Fit ``make(seed_i)`` on the train part of split i and score it on the test part, for
    ``repeats`` seeds; split i depends only on (y, seed + i), so every classifier evaluated with
    the same arguments sees the same splits and their scores compare repeat by repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    classes = np.unique(y)
    scores = Scores(classes=classes)
    for i in tqdm(range(repeats), desc=desc, unit="repeat", disable=not progress, leave=False):
        train, test = stratified_split(y, test_fraction, seed + i)
        prediction = make(seed + i).fit(X[train], y[train]).predict(X[test])
        scores.accuracy.append(float((prediction == y[test]).mean()))
        scores.macro_f1.append(float(f1_score(y[test], prediction, labels=classes, average="macro",
                                              zero_division=0)))
        scores.recall.append(recall_score(y[test], prediction, labels=classes, average=None, zero_division=0))
        if i == 0:
            scores.y_true, scores.y_pred = y[test], prediction
    return scores


def logistic_regression(seed: int) -> LogisticRegression:
    """The expression-only control: what a linear model reaches without any encoder."""
    return LogisticRegression(max_iter=1000, random_state=seed)


def knn(seed: int, k: int = 10) -> Any:
    """k-nearest-neighbour classifier (k = 10, as the authors' own evaluation), Euclidean on the
    features as they are (as scanpy's neighbour graph uses an embedding): the embedding's local
    structure, with no trained weights."""
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k)


def clustering_agreement(X: Any, y: np.ndarray, seed: int = 0, silhouette_cells: int = 3000) -> dict[str, float]:
    """How well the embedding's own structure matches the labels, with no label used to build it:
    ARI and NMI of k-means with as many clusters as labels, and the silhouette of the labels (on
    at most ``silhouette_cells`` cells, a seeded sample); Euclidean on the features as they are."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    X = np.asarray(X, dtype=np.float64)
    clusters = KMeans(n_clusters=len(np.unique(y)), n_init=10, random_state=seed).fit_predict(X)
    sample = min(len(y), silhouette_cells)
    return {"ari": float(adjusted_rand_score(y, clusters)), "nmi": float(normalized_mutual_info_score(y, clusters)),
            "silhouette": float(silhouette_score(X, y, sample_size=sample, random_state=seed))}


def pca_features(expression: Any, components: int = 50, seed: int = 0) -> np.ndarray:
    """The first ``components`` principal components of (log1p CP10k) expression: the standard
    single-cell embedding a pretrained encoder has to beat."""
    from sklearn.decomposition import PCA

    components = min(components, min(expression.shape) - 1)
    solver = "arpack" if hasattr(expression, "tocsr") else "auto"  # arpack centres sparse input implicitly
    return PCA(n_components=components, svd_solver=solver, random_state=seed).fit_transform(expression)


def collapse_diagnostics(X: Any, library_size: np.ndarray, n_genes: np.ndarray) -> dict[str, float]:
    """How an embedding can fail without a probe saying why: its effective rank (exp of the entropy
    of its normalised singular values, Roy & Vetterli 2007; RankMe uses it to spot collapse), and
    how much of it the cell's sequencing depth explains: the mean over the z-scored features of
    their squared correlation with log library size, and with log genes expressed (1: every feature
    is a function of depth; about 1/cells for features independent of it)."""
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    p = singular / singular.sum() if singular.sum() > 0 else np.ones(1)
    p = p[p > 0]
    std = centred.std(axis=0)
    z = centred[:, std > 1e-12] / std[std > 1e-12]

    def explained(covariate: np.ndarray) -> float:
        c = np.log1p(np.asarray(covariate, dtype=np.float64))
        if z.shape[1] == 0 or c.std() == 0:
            return 0.0
        c = (c - c.mean()) / c.std()
        return float(np.mean((z.T @ c / len(c)) ** 2))

    return {"effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "library_size_r2": explained(library_size), "n_genes_r2": explained(n_genes)}
