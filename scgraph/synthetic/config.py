"""The synthetic study's configuration (``launchers/synthetic.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scgraph.cli import option
from scgraph.config import LR_SCHEDULES, check_choice, check_schedule
from scgraph.models.config import BLOCK_LAYOUTS

#: The paper restricts beta to [0, 0.5]; up to 1 is allowed for exploration. Beyond it the
#: predecessor term 2 beta v_{k-1} amplifies every step and values grow geometrically.
BETA_RANGE = (0.0, 1.0)
INITS = ("pytorch", "census")


def _generators() -> tuple[str, ...]:
    from scgraph.synthetic.generators import GENERATORS

    return GENERATORS


def _default_generator() -> str:
    from scgraph.synthetic.generators import DEFAULT_GENERATOR

    return DEFAULT_GENERATOR


@dataclass
class StudyConfig:
    """The synthetic relative-position study (paper Table I, Figure 3): per (beta, sigma) train a one-layer
    Transformer and GNN (hidden 8) on masked value prediction and compare their best test MSE. Writes
    OUT/table1.csv, table1.txt, fig3a_best_loss_vs_beta.png, fig3b_test_loss_curves.png, results.json, and logs to
    MLflow."""

    generator: str | None = option(None, "value generator (default: static_decay, whose error floors are the "
                                   "closest to the paper's Table I; benchmarks/bench_generators.py)",
                                   choices=_generators)
    betas: tuple[float, ...] = option((0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "relative-position coefficients, each in "
                                      f"[{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]", metavar="B,B,...")
    sigmas: tuple[float, ...] = option((0.1, 0.2, 0.3, 0.4, 0.5), "std of the exogenous values, each > 0",
                                       metavar="S,S,...")
    samples: int = option(20_000, "samples per dataset")
    train_fraction: float = option(0.7, "share of samples for training; the rest is the test set")
    epochs: int = option(200, "training epochs per model")
    batch_size: int = option(256, "batch size")
    lr: float = option(1e-3, "peak Adam learning rate")
    lr_schedule: str = option("constant", "learning rate after the warmup: constant, or decayed to --min-lr by the "
                              "last step (cosine, linear)", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "steps of linear warmup from lr/warmup to lr")
    min_lr: float = option(0.0, "learning rate at the last step of a cosine or linear decay")
    repeats: int = option(1, "datasets (and model inits) per setting; losses are averaged over them")
    alpha: float = option(0.1, "absolute-position coefficient")
    mu: tuple[float, ...] = option((1.0, 2.0, 3.0, 4.0), "means of the exogenous values of tokens A, B, C, D",
                                   metavar="M,M,M,M")
    w_seed: int = option(0, "seed of the static coefficients w ~ U(-0.5, 0.5), shared by every setting")
    seed: int = option(0, "seed of the datasets and model inits")
    hidden: int = option(8, "model width")
    mlp_ratio: float = option(0.0, "feed-forward width / hidden in the Block (0: no feed-forward, the paper's "
                              "'single layer' between linear input and output layers)")
    heads: int = option(2, "Transformer attention heads (same parameter count for any number; with one, attention "
                        "can only average the senders' values and stalls far above its floor at beta > 0)")
    graph_heads: int = option(2, "GNN adjacencies, softmax-normalised, of rank 4 each, as many as the Transformer's "
                              "heads (with one, it weights every sender's value with one sign and stalls far above "
                              "its floor; see benchmarks/RESULTS.md)")
    block_layout: str = option("residual", "layout of the shared Block (residual: no normalisation, so the GNN is "
                               "the bare static aggregation of the values; see scgraph/synthetic/models.py)",
                               choices=BLOCK_LAYOUTS)
    position_embedding: bool = option(True, "a learned absolute-position embedding in both models")
    init: str = option("pytorch", "initialisation of the Linear layers: pytorch (PyTorch's default, as the paper's "
                       "nn layers) or census (N(0, 0.02), the large models'; slow to leave the flat attention saddle "
                       "at hidden 8)", choices=INITS)
    standardize: bool = option(True, "feed values standardized by the training set's mean and std (losses are "
                               "reported in the generator's units either way)")
    workers: int = option(2, "parallel processes, one thread each (1: run in this process)")
    out: Path = option(Path("runs/synthetic"), "output directory")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                    "sqlite:///mlflow.db)")
    experiment: str = option("synthetic", "MLflow experiment name")
    overwrite: bool = option(False, "replace the results --out holds from a study with other settings; without it "
                             "they are refused")

    def __post_init__(self) -> None:
        from scgraph.synthetic.generators import N_TOKENS

        if self.generator is None:
            self.generator = _default_generator()
        check_choice("generator", self.generator, _generators())
        check_choice("block_layout", self.block_layout, BLOCK_LAYOUTS)
        check_choice("init", self.init, INITS)
        self.betas, self.sigmas, self.mu = tuple(self.betas), tuple(self.sigmas), tuple(self.mu)
        for name, grid in (("betas", self.betas), ("sigmas", self.sigmas)):
            if not grid:
                raise ValueError(f"{name} must hold at least one value")
            if len(set(grid)) != len(grid):
                raise ValueError(f"{name} must not repeat a value; got {grid}")
        low, high = BETA_RANGE
        if not all(low <= b <= high for b in self.betas):
            raise ValueError(f"betas must lie in [{low}, {high}]; got {self.betas}")
        if not all(s > 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be > 0; got {self.sigmas}")
        if len(self.mu) != N_TOKENS:
            raise ValueError(f"mu must hold {N_TOKENS} means, one per token; got {self.mu}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1); got {self.train_fraction}")
        for name in ("samples", "epochs", "batch_size", "repeats", "hidden", "heads", "graph_heads", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        n_test = self.samples - round(self.samples * self.train_fraction)
        if n_test < 1 or n_test == self.samples:
            raise ValueError(f"samples ({self.samples}) is too small to split {self.train_fraction:g} "
                             "train / rest test")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        check_schedule(self)
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0; got {self.mlp_ratio}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.hidden % (N_TOKENS * self.graph_heads):
            raise ValueError(f"hidden ({self.hidden}) must be divisible by the adjacency rank ({N_TOKENS}) times "
                             f"graph_heads ({self.graph_heads}) so each GNN head's values split into sub-heads")
        self.out = Path(self.out)

    def params(self) -> dict[str, Any]:
        """Flat, MLflow-ready parameters (tuples as comma-separated strings)."""
        return {k: ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)
                for k, v in dataclasses.asdict(self).items()}


# --- sharding (``python -m sharding``) ------------------------------------------------------------
