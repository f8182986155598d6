"""The engine-agnostic training core and a plain single-process loop built on it.

``mvp_loss_on`` is the one place a batch becomes a loss: the plain loop here and the DeepSpeed
engine both call it, so the two paths cannot drift apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from scgraph.config import TrainConfig
from scgraph.data.batch import Batch
from scgraph.models.model import CellModel, mvp_loss


def mvp_loss_on(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    pred = model(batch.genes, batch.values, batch.masked)
    return mvp_loss(pred, batch.values, batch.masked)


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    cells: int = 0
    seconds: float = 0.0

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds if self.seconds else 0.0

    def mean_loss(self, last: int) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def train_plain(model: CellModel, batches: Iterable[Batch], cfg: TrainConfig, *,
                device: str | torch.device = "cpu", desc: str = "train",
                progress: bool = True) -> History:
    """Adam(W) on the MVP loss for ``cfg.max_steps`` steps; stops early if ``batches`` runs out."""
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = History()
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc=desc, disable=not progress, leave=False)
    for step, batch in enumerate(batches, start=1):
        batch = batch.to(device)
        loss = mvp_loss_on(model, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"MVP loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history.losses.append(loss.item())
        history.cells += len(batch)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{history.mean_loss(cfg.log_every):.4f}")
        bar.update()
        if step >= cfg.max_steps:
            break
    bar.close()
    history.seconds = time.perf_counter() - start
    return history
