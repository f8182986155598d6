"""The study's typed, validated configuration; defaults are the paper's Table I protocol (SPEC §2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scgraph.config import BLOCK_LAYOUTS
from scgraph.synthetic.generators import DEFAULT_GENERATOR, GENERATORS, N_TOKENS

#: The paper restricts beta to [0, 0.5]; up to 1 is allowed for exploration. Beyond it the
#: predecessor term 2 beta v_{k-1} amplifies every step and values grow geometrically.
BETA_RANGE = (0.0, 1.0)
BACKBONE_LABELS = {"transformer": "TF", "gnn": "GNN"}
INITS = ("pytorch", "census")


@dataclass
class StudyConfig:
    """One Table I study: a (beta x sigma) grid, both models per setting, ``repeats`` datasets each."""

    generator: str = DEFAULT_GENERATOR
    betas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    samples: int = 20_000
    train_fraction: float = 0.7
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    repeats: int = 1
    alpha: float = 0.1
    mu: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    w_seed: int = 0
    seed: int = 0
    hidden: int = 8
    mlp_ratio: float = 0.0
    heads: int = 1
    block_layout: str = "post_norm"
    position_embedding: bool = True
    init: str = "pytorch"
    standardize: bool = True
    workers: int = 2
    out: Path = Path("runs/synthetic")
    mlflow_uri: str | None = None
    experiment: str = "synthetic"

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(GENERATORS)}; got {self.generator!r}")
        if self.block_layout not in BLOCK_LAYOUTS:
            raise ValueError(f"block_layout must be one of {', '.join(BLOCK_LAYOUTS)}; "
                             f"got {self.block_layout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
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
        for name in ("samples", "epochs", "batch_size", "repeats", "hidden", "heads", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        n_test = self.samples - round(self.samples * self.train_fraction)
        if n_test < 1 or n_test == self.samples:
            raise ValueError(f"samples ({self.samples}) is too small to split {self.train_fraction:g} "
                             "train / rest test")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0; got {self.mlp_ratio}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.hidden % N_TOKENS:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by the adjacency rank "
                             f"({N_TOKENS}) so the GNN's values split into sub-heads")
        self.out = Path(self.out)

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI: given, or a sqlite database under ``out`` (MLflow 3 refuses ./mlruns)."""
        return self.mlflow_uri or f"sqlite:///{(self.out / 'mlflow.db').resolve()}"

    def params(self) -> dict[str, Any]:
        """Flat, MLflow-ready parameters (tuples as comma-separated strings)."""
        return {k: ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)
                for k, v in dataclasses.asdict(self).items()}
