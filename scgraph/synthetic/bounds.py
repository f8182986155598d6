"""What any model could reach: the error floors that put Table I's losses and ratios in scale.

Every generator of the family is linear in the exogenous values e given the order, and e is
Gaussian, so given the order the masked value and the other three are jointly Gaussian and the best
predictor is linear. Least squares on a large fresh sample gives four floors:

- ``order_and_values``: one linear predictor per (order, masked position), the Bayes error. Its
  weights on the values depend on where each sender sits, as attention's can: the Transformer's floor.
- ``static_adjacency``: what a static adjacency with absolute positions and a linear read-out can
  express: the receiver's own position, plus for every sender a term in its
  value and a term in its position, each weighted by the (receiver, sender) token pair only, never
  by where the two sit relative to each other: the GNN's floor.
- ``token_weights``: the mean given the whole order, plus token-pair weights on the values: a GNN
  that somehow knew every position at once; the gap to ``static_adjacency`` is what the order's
  non-additive part (which token precedes the receiver) is worth.
- ``order_only``: the mean given the order, nothing from the values.

``static_adjacency / order_and_values`` is the GNN/TF ratio to expect when both models reach their
floors; ``scgraph.synthetic.calibration`` compares it with the paper's Table I.
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
    static_adjacency: float
    token_weights: float
    order_only: float

    @property
    def ratio(self) -> float:
        """The GNN/TF ratio of two models at their floors: a static adjacency against positional weights."""
        return self.static_adjacency / self.order_and_values


def _squared_residuals(x: np.ndarray, y: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(((x @ coef - y) ** 2).sum())


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)


def floors(generator: str, *, beta: float, sigma: float, w, alpha: float, mu: tuple[float, ...],
           samples: int = 100_000, seed: int = 0) -> Floors:
    """The three floors at one (beta, sigma), from ``samples`` fresh samples (in-sample least
    squares with at most 27 coefficients per fit over >= samples / 96 rows: optimism under 0.5%)."""
    data = make_dataset(generator, samples, beta=beta, sigma=sigma, w=w, alpha=alpha, mu=mu, seed=seed)
    v, tokens = data.values.double().numpy(), data.tokens.numpy()
    masked = data.masked.numpy().argmax(1)
    order = (tokens * N_TOKENS ** np.arange(N_TOKENS)).sum(1)
    target = v[np.arange(samples), masked]
    by_token = np.zeros_like(v)
    np.put_along_axis(by_token, tokens, v, axis=1)
    receiver = tokens[np.arange(samples), masked]
    position = np.argsort(tokens, axis=1)  # position[i, t]: where token t sits in sample i
    positional = static = additive = mean_only = 0.0
    for t in range(N_TOKENS):
        rows = np.flatnonzero(receiver == t)
        y = target[rows]
        # within one receiving token, the order fixes the masked position: one group per order
        for o in np.unique(order[rows]):
            group = rows[order[rows] == o]
            k = masked[group[0]]
            positional += _squared_residuals(np.c_[np.delete(v[group], k, axis=1), np.ones(len(group))],
                                             target[group])
            mean_only += float(((target[group] - target[group].mean()) ** 2).sum())
        static += _squared_residuals(np.c_[_one_hot(order[rows]), np.delete(by_token[rows], t, axis=1)], y)
        others = [s for s in range(N_TOKENS) if s != t]
        features = [_one_hot(position[rows, t]), by_token[rows][:, others],
                    *(_one_hot(position[rows, s]) for s in others)]
        additive += _squared_residuals(np.concatenate(features, axis=1), y)
    return Floors(beta, sigma, positional / samples, additive / samples, static / samples, mean_only / samples)
