"""The synthetic generator family: four tokens, every order, values with a tunable
relative-position effect.

The paper's text does not fix its generator's formula, so the family holds every reading of that
text that was tried: a token term alpha p + e, a static influence w of the other values, and a
relative-position influence scaled by beta. ``static_decay`` (the two preceding values weighted
2.2 beta and 0.5 beta) is the default because its error floors are the closest to the paper's Table I
(``scgraph.synthetic.calibration``; benchmarks/RESULTS.md has the table). All generators share one interface:
``values(generator, orders, e, w, alpha, beta)`` is a pure function, so a hand-worked sample can be
checked against it, and ``make_dataset`` only draws its random inputs.

Conventions: a token id t in 0..3 stands for A..D; ``orders[i, k]`` is the token at position k of
sample i; ``e[i, t]`` is token t's exogenous value; ``w[t, s]`` is the static influence of token s
on token t (diagonal unused). Values are returned in position order, as the models see them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

TOKENS = "ABCD"
N_TOKENS = len(TOKENS)
#: Every order of the four tokens, (24, 4).
ORDERS = torch.tensor(list(itertools.permutations(range(N_TOKENS))), dtype=torch.long)


@dataclass(frozen=True)
class SequentialTerms:
    """Which terms a generator that walks the permutation left to right adds to v_k:

    ``static``: sum_{j<k} w[t_k, t_j] v_j / 4; ``relative``: sum_{j<k} beta phi(k - j) v_j with
    phi(d) = ``relative[d - 1]``, the relative-position influence: a weight on each earlier value
    that depends only on how far back it sits.
    """

    static: bool
    relative: tuple[float, float, float]


#: Generators built by walking the permutation; ``simultaneous`` is the one that is not.
SEQUENTIAL: dict[str, SequentialTerms] = {
    "sequential": SequentialTerms(static=True, relative=(1 / 4, 2 / 4, 3 / 4)),  # phi(d) = d / 4
    "predecessor": SequentialTerms(static=False, relative=(2.0, 0.0, 0.0)),
    "static_predecessor": SequentialTerms(static=True, relative=(2.0, 0.0, 0.0)),
    "static_decay": SequentialTerms(static=True, relative=(2.2, 0.5, 0.0)),
}
GENERATORS = ("simultaneous", *SEQUENTIAL)
DEFAULT_GENERATOR = "static_decay"


def _simultaneous(orders: torch.Tensor, e: torch.Tensor, w: torch.Tensor, alpha: float,
                  beta: float) -> torch.Tensor:
    """v_t = alpha p_t + e_t + sum_{s != t} (w_ts + beta (p_s - p_t)) e_s, all from exogenous values."""
    positions = torch.argsort(orders, dim=1).to(e.dtype)  # p_t, token-major
    w = w - torch.diag(torch.diag(w))
    relative = (positions * e).sum(1, keepdim=True) - positions * e.sum(1, keepdim=True)
    v = alpha * positions + e + e @ w.T + beta * relative
    return torch.gather(v, 1, orders)


def _sequential(terms: SequentialTerms, orders: torch.Tensor, e: torch.Tensor, w: torch.Tensor,
                alpha: float, beta: float) -> torch.Tensor:
    """v_k = alpha k + e_k + the chosen terms over the already generated v_j (j < k)."""
    e_pos = torch.gather(e, 1, orders)
    v = torch.zeros_like(e_pos)
    for k in range(orders.shape[1]):
        vk = alpha * k + e_pos[:, k]
        if k:
            earlier = v[:, :k]
            if terms.static:
                coef = w[orders[:, k:k + 1], orders[:, :k]]  # w[t_k, t_j], (n, k)
                vk = vk + (coef * earlier).sum(1) / N_TOKENS
            phi = torch.tensor(terms.relative[:k][::-1], dtype=e.dtype)  # phi(k - j) for j = 0..k-1
            vk = vk + beta * (phi * earlier).sum(1)
        v[:, k] = vk
    return v


def values(generator: str, orders: torch.Tensor, e: torch.Tensor, w: torch.Tensor, alpha: float,
           beta: float) -> torch.Tensor:
    """The deterministic part of a generator: (n, 4) values in position order."""
    if generator == "simultaneous":
        return _simultaneous(orders, e, w, alpha, beta)
    if generator not in SEQUENTIAL:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}; got {generator!r}")
    return _sequential(SEQUENTIAL[generator], orders, e, w, alpha, beta)


def static_coefficients(seed: int, low: float = -0.5, high: float = 0.5) -> torch.Tensor:
    """w ~ U(low, high), (4, 4), drawn once from ``seed`` so every setting of a study shares it and
    beta is the only thing that changes down Table I."""
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(N_TOKENS, N_TOKENS, generator=gen, dtype=torch.float64)


@dataclass
class SyntheticData:
    """Samples in position order: ``tokens`` (n, 4) ids, ``values`` (n, 4), ``masked`` (n, 4) with
    exactly one True per row (the value to predict)."""

    tokens: torch.Tensor
    values: torch.Tensor
    masked: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def standardized(self, mean: float, std: float) -> SyntheticData:
        """Values as (v - mean) / std; tokens and mask unchanged."""
        return SyntheticData(self.tokens, (self.values - mean) / std, self.masked)

    def split(self, train_fraction: float) -> tuple[SyntheticData, SyntheticData]:
        """Head/tail split; the samples are i.i.d., so this is a random split."""
        n = round(len(self) * train_fraction)
        head = SyntheticData(self.tokens[:n], self.values[:n], self.masked[:n])
        tail = SyntheticData(self.tokens[n:], self.values[n:], self.masked[n:])
        return head, tail


def make_dataset(generator: str, n: int, *, beta: float, sigma: float, w: torch.Tensor,
                 alpha: float = 0.1, mu: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0),
                 seed: int = 0) -> SyntheticData:
    """Draw ``n`` samples: a uniform order out of 24, e_t ~ N(mu_t, sigma^2), one random mask."""
    gen = torch.Generator().manual_seed(seed)
    orders = ORDERS[torch.randint(len(ORDERS), (n,), generator=gen)]
    e = torch.tensor(mu, dtype=torch.float64) + sigma * torch.randn(n, N_TOKENS, generator=gen,
                                                                   dtype=torch.float64)
    v = values(generator, orders, e, w, alpha, beta)
    masked = torch.zeros(n, N_TOKENS, dtype=torch.bool)
    masked[torch.arange(n), torch.randint(N_TOKENS, (n,), generator=gen)] = True
    return SyntheticData(orders, v.float(), masked)
