"""The optimizer's parameter groups, the learning-rate schedule, and the DeepSpeed engine around them.

Weight decay pulls weights toward zero; on a gene embedding or an adjacency factor that means
shrinking the rows of genes a batch happens to contain, and on a norm or a bias it fights the
layer's purpose, so only the weight matrices of linear layers decay (as in GPT-2, nanoGPT,
torchtune). The schedule is a function of the optimizer step, so DeepSpeed's checkpoint of the
scheduler (its step count) restores it exactly on resume.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from scgraph.config import TrainConfig


class Schedule(Protocol):
    """What ``lr_factor`` reads: ``TrainConfig`` (pretraining) and ``StudyConfig`` (the synthetic study)."""

    lr: float
    lr_schedule: str
    warmup_steps: int
    min_lr: float


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: linear layers' weight matrices (decayed), everything else (not)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = dict(model.named_parameters())
    groups = [{"params": [p for p in params.values() if id(p) in decayed], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if id(p) not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: Schedule, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (0-based), as a multiple of ``cfg.lr``: linear
    warmup over ``warmup_steps``, then constant, or a cosine or linear decay reaching
    ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def scheduler(cfg: TrainConfig, total_steps: int):
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: the optimizer -> its LambdaLR."""
    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))

    return build


def deepspeed_engine(model: nn.Module, ds: dict[str, Any], train: TrainConfig, total_steps: int):
    """The DeepSpeed engine that trains ``model`` under the resolved config ``ds``. Without an
    optimizer block in ``ds`` (the shipped configs) DeepSpeed is given torch's fused AdamW, which needs
    nothing built. An Adam/AdamW block makes DeepSpeed use its own FusedAdam (or, with ZeRO-Offload,
    DeepSpeedCPUAdam) instead: C++/CUDA ops it compiles at start, which fails without a CUDA compiler
    (``CUDA_HOME``), as on a GPU machine with pip-installed torch. (With offload and the client
    optimizer the config must set ``zero_force_ds_cpu_optimizer: false``.)"""
    import deepspeed

    groups = param_groups(model, train.weight_decay)
    # fused: one kernel for all parameters (4x cheaper than the default on CPU)
    client = None if "optimizer" in ds else torch.optim.AdamW(groups, lr=train.lr, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, model_parameters=groups,
                                           lr_scheduler=scheduler(train, total_steps), config=ds)
    return engine
