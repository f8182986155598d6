"""What any model could reach: the error floors that put Table I's losses and ratios in scale.

Every generator of SPEC §2 is linear in the exogenous values e given the order, and e is Gaussian,
so given the order the masked value and the other three are jointly Gaussian and the best
predictor is linear, one per (order, masked position). Least squares on a large fresh sample gives
two floors:

- ``order_and_values``: from the order and the other three values, the Bayes error; a model that
  can weight each value by where its sender sits (attention) can approach it.
- ``order_only``: from the order alone (the mean given the order); a model that knows positions but
  takes nothing from the values. A GNN with a static adjacency sits between the two: its weights
  on the values depend on the tokens, not on where they sit.

Their quotient bounds the GNN/TF ratio a study should expect when both models know positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scgraph.synthetic.generators import N_TOKENS, make_dataset


@dataclass(frozen=True)
class Floors:
    beta: float
    sigma: float
    order_and_values: float
    order_only: float

    @property
    def ratio(self) -> float:
        """The largest GNN/TF ratio of a GNN no worse than the order-only predictor and a perfect TF."""
        return self.order_only / self.order_and_values


def floors(generator: str, *, beta: float, sigma: float, w, alpha: float, mu: tuple[float, ...],
           samples: int = 100_000, seed: int = 0) -> Floors:
    """Both floors at one (beta, sigma), from ``samples`` fresh samples (in-sample least squares:
    96 groups of 5 coefficients, so the optimism is ~5 / (samples / 96), under 0.5% at 100k)."""
    data = make_dataset(generator, samples, beta=beta, sigma=sigma, w=w, alpha=alpha, mu=mu, seed=seed)
    v = data.values.double().numpy()
    masked = data.masked.numpy().argmax(1)
    order = (data.tokens.numpy() * N_TOKENS ** np.arange(N_TOKENS)).sum(1)
    group = order * N_TOKENS + masked
    full = mean_only = 0.0
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        k = masked[rows[0]]
        y = v[rows, k]
        x = np.c_[np.delete(v[rows], k, axis=1), np.ones(len(rows))]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        full += float(((x @ coef - y) ** 2).sum())
        mean_only += float(((y - y.mean()) ** 2).sum())
    return Floors(beta, sigma, full / samples, mean_only / samples)
