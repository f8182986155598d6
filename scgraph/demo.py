"""The README's `make demo`: both backbones trained on real CBMC cells, MVP losses side by side.

This is what exists end to end today; later stages (shards, DeepSpeed, probe, Table II) extend it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scgraph.config import BACKBONES, ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from scgraph.data.batch import iterate_batches, make_batch
from scgraph.data.datasets import load_cbmc
from scgraph.models import build_model, count_parameters
from scgraph.train.loop import train_plain


@dataclass
class DemoSettings:
    preset: str = "scbenchmark"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    adjacency_rank: int = 16
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 300
    lr: float = 1e-3
    held_out_cells: int = 1000
    seed: int = 0


def _held_out_mse(model, batch) -> float:
    with torch.no_grad():
        pred = model.eval()(batch.genes, batch.values, batch.masked)
    return float(((pred - batch.values)[batch.masked] ** 2).mean())


def run_demo(settings: DemoSettings) -> dict[str, dict[str, float]]:
    data = load_cbmc()
    vocab = data.counts.shape[1]
    order = np.random.default_rng(settings.seed).permutation(data.counts.shape[0])
    train_cells = data.counts[order[settings.held_out_cells:]]
    test_cells = data.counts[order[:settings.held_out_cells]]
    print(f"CBMC (Stoeckius et al. 2017): {data.counts.shape[0]} cells x {vocab} genes, "
          f"{len(set(data.labels))} cell types; "
          f"{train_cells.shape[0]} train / {test_cells.shape[0]} held out")
    results: dict[str, dict[str, float]] = {}
    for backbone in BACKBONES:
        run = RunConfig(
            model=ModelConfig(backbone=backbone, preset=settings.preset, vocab_size=vocab,
                              hidden=settings.hidden, layers=settings.layers, heads=settings.heads,
                              adjacency_rank=settings.adjacency_rank),
            tokenizer=TokenizerConfig(seq_len=settings.seq_len),
            train=TrainConfig(lr=settings.lr, batch_size=settings.batch_size, max_steps=settings.steps,
                              seed=settings.seed))
        torch.manual_seed(settings.seed)
        model = build_model(run.model)
        batches = iterate_batches(train_cells, run.tokenizer, vocab, run.train.batch_size,
                                  run.train.mask_ratio, settings.seed)
        history = train_plain(model, batches, run.train, desc=backbone)
        test = make_batch(test_cells, run.tokenizer, vocab, run.train.mask_ratio,
                          np.random.default_rng(settings.seed + 1))
        target = test.values[test.masked]
        results[backbone] = {
            "params": count_parameters(model)["params_total"],
            "first_loss": history.losses[0],
            "final_loss": history.mean_loss(20),
            "held_out_mse": _held_out_mse(model, test),
            "mean_baseline_mse": float(((target - target.mean()) ** 2).mean()),
            "cells_per_s": history.cells_per_second,
        }
    _print_table(results, settings)
    return results


def _print_table(results: dict[str, dict[str, float]], settings: DemoSettings) -> None:
    rows = [("parameters", "params", "{:,.0f}"), ("MVP loss, first step", "first_loss", "{:.4f}"),
            ("MVP loss, last 20 steps", "final_loss", "{:.4f}"),
            ("held-out MVP MSE", "held_out_mse", "{:.4f}"),
            ("held-out MSE of the mean", "mean_baseline_mse", "{:.4f}"),
            ("training cells/s", "cells_per_s", "{:,.0f}")]
    print(f"\nMasked value prediction, preset {settings.preset}, {settings.layers} layers, "
          f"hidden {settings.hidden}, {settings.seq_len} genes/cell, {settings.steps} steps")
    print(f"{'':28}{'transformer':>14}{'gnn':>14}")
    for label, key, fmt in rows:
        print(f"{label:28}" + "".join(f"{fmt.format(results[b][key]):>14}" for b in BACKBONES))
