"""Train one model on one synthetic dataset: the paper's protocol (Adam, batch 256, best test MSE).

Not the pretraining trainer: the paper's protocol here is whole in-memory epochs of a tiny model
with the test MSE after each, in a pool of single-thread processes, with no checkpoints, ranks or
loader to manage.

A task seeds its own generators, so a (setting, repeat, backbone) gives the same numbers whether
it runs in the main process or in a pool worker, and in any order. This module is all a pool
worker imports (no MLflow, no matplotlib), which keeps worker start-up short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scgraph.models.config import short_name
from scgraph.models.model import CellModel, mvp_loss
from scgraph.synthetic.config import StudyConfig
from scgraph.synthetic.generators import SyntheticData, make_dataset, static_coefficients
from scgraph.synthetic.models import build_synthetic_model
from scgraph.train.optim import lr_factor

#: The two models the study compares, with the labels of Table I and Figure 3.
BACKBONE_LABELS = {backbone: short_name(backbone) for backbone in ("transformer", "gnn")}


@dataclass
class Curve:
    """Test MSE on the masked values after every epoch; the study reports its minimum."""

    test_losses: list[float]

    @property
    def best(self) -> float:
        return min(self.test_losses)

    @property
    def best_epoch(self) -> int:
        return self.test_losses.index(self.best) + 1


@torch.no_grad()
def evaluate(model: CellModel, data: SyntheticData, loss_scale: float = 1.0) -> float:
    model.eval()
    pred = model(data.tokens, data.values, data.masked)
    return mvp_loss(pred, data.values, data.masked).item() * loss_scale


def train_model(model: CellModel, train: SyntheticData, test: SyntheticData, cfg: StudyConfig, *, seed: int,
                loss_scale: float = 1.0) -> Curve:
    """Adam for ``cfg.epochs`` shuffled passes (the last short batch kept) under the pretraining
    trainer's learning-rate schedule, test loss after each.

    ``loss_scale`` converts the test MSE back to the generator's units when the data were
    standardized (std**2), so Table I is comparable whatever the models were fed.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fewer kernel launches
    total_steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for idx in order.split(cfg.batch_size):
            loss = mvp_loss(model(train.tokens[idx], train.values[idx], train.masked[idx]),
                            train.values[idx], train.masked[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        losses.append(evaluate(model, test, loss_scale))
    return Curve(losses)


@dataclass(frozen=True)
class Task:
    beta: float
    sigma: float
    repeat: int
    backbone: str

    @property
    def setting(self) -> tuple[float, float]:
        return self.beta, self.sigma


def task_seed(cfg: StudyConfig, task: Task) -> int:
    """Dataset and initialisation seed of a task: shared by both backbones, independent of the grid."""
    key = [cfg.seed, task.repeat, round(task.beta * 1e6), round(task.sigma * 1e6)]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def run_task(cfg: StudyConfig, task: Task) -> tuple[Task, Curve]:
    """Generate the task's dataset and train its model; pure in (cfg, task)."""
    seed = task_seed(cfg, task)
    data = make_dataset(cfg.generator, cfg.samples, beta=task.beta, sigma=task.sigma,
                        w=static_coefficients(cfg.w_seed), alpha=cfg.alpha, mu=cfg.mu, seed=seed)
    train, test = data.split(cfg.train_fraction)
    std = 1.0
    if cfg.standardize:
        mean, std = train.values.mean().item(), train.values.std().item()
        train, test = train.standardized(mean, std), test.standardized(mean, std)
    torch.manual_seed(seed)
    model = build_synthetic_model(cfg, task.backbone)
    curve = train_model(model, train, test, cfg, seed=seed, loss_scale=std ** 2)
    return task, curve


def single_thread() -> None:
    """One intra-op thread: the tensors are tiny, so extra threads only add synchronisation, and
    two single-thread workers on two cores beat one process on both."""
    torch.set_num_threads(1)
