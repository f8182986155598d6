"""Command line and YAML for pretraining: defaults < ``--config run.yaml`` < command-line flags.

The YAML mirrors the dataclasses: sections ``model``, ``tokenizer``, ``train`` and the top-level
fields of ``PretrainConfig`` (shards, output, deepspeed_config, ...). Unknown keys are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from scgraph.config import (
    BACKBONES,
    NORMALIZATIONS,
    PRESETS,
    SELECTIONS,
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
)
from scgraph.train.engine import PretrainConfig

SECTIONS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "train": TrainConfig}

# flag -> (section or None for PretrainConfig, field, type, help)
FLAGS: list[tuple[str, str | None, str, Any, str]] = [
    ("--backbone", "model", "backbone", str, f"token mixer: {' or '.join(BACKBONES)} (default transformer)"),
    ("--preset", "model", "preset", str, f"architecture preset: {' or '.join(PRESETS)} (default scbenchmark, "
                                          "the authors' released layouts)"),
    ("--hidden", "model", "hidden", int, "hidden size d (default 256)"),
    ("--layers", "model", "layers", int, "number of blocks (default 6)"),
    ("--heads", "model", "heads", int, "attention heads of the Transformer (default 8)"),
    ("--adjacency-rank", "model", "adjacency_rank", int, "rank r of the GNN adjacency factors (default 64)"),
    ("--graph-heads", "model", "graph_heads", int, "independent adjacencies per GNN layer (default 1)"),
    ("--dropout", "model", "dropout", float, "dropout (default 0)"),
    ("--seq-len", "tokenizer", "seq_len", int, "genes per cell L (default 512)"),
    ("--normalization", "tokenizer", "normalization", str,
     f"value normalisation: {' or '.join(NORMALIZATIONS)} (default log1p of counts per 10k)"),
    ("--n-bins", "tokenizer", "n_bins", int, "bin values scGPT-style into this many bins (default: no binning)"),
    ("--selection", "tokenizer", "selection", str,
     f"which genes when a cell has more than L: {' or '.join(SELECTIONS)} (default random)"),
    ("--lr", "train", "lr", float, "Adam learning rate (default 2e-4)"),
    ("--batch-size", "train", "batch_size", int,
     "global batch in cells = micro-batch x ranks x accumulation (default 256)"),
    ("--max-steps", "train", "max_steps", int, "optimizer steps (default 1000; --epochs overrides)"),
    ("--mask-ratio", "train", "mask_ratio", float, "fraction of each cell's values to predict (default 0.15)"),
    ("--seed", "train", "seed", int, "seed of model init, data order and masks (default 0)"),
    ("--log-every", "train", "log_every", int, "log metrics every N steps (default 10)"),
    ("--shards", None, "shards", str, "shard directory written by `python -m sharding write`"),
    ("--output", None, "output", str, "run directory: checkpoints, figures (default runs/pretrain)"),
    ("--micro-batch-size", None, "micro_batch_size", int,
     "cells per rank per forward; overrides the DeepSpeed config's train_micro_batch_size_per_gpu"),
    ("--epochs", None, "epochs", int, "train this many epochs over the shards instead of --max-steps"),
    ("--checkpoint-every", None, "checkpoint_every", int, "save a checkpoint every N steps (default 500)"),
    ("--mlflow-uri", None, "mlflow_uri", str,
     "MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
    ("--experiment", None, "experiment", str, "MLflow experiment name (default scgraph)"),
    ("--run-name", None, "run_name", str, "MLflow run name (default: MLflow's)"),
    ("--num-workers", None, "num_workers", int, "DataLoader worker processes per rank (default 0)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Masked-value pretraining of a Transformer or GNN backbone on WebDataset shards with "
                    "DeepSpeed ZeRO. Run with `deepspeed`, `torchrun` or plain `python` (one process).",
        epilog="Example: deepspeed --num_gpus 2 launchers/pretrain.py --backbone gnn --shards shards/ "
               "--deepspeed_config ds_configs/cpu_zero2.json --max-steps 20 --output runs/gnn")
    parser.add_argument("--config", type=Path, help="YAML file with model/tokenizer/train sections and run fields")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON (ds_configs/); default: plain data parallel in fp32")
    for flag, _, name, kind, text in FLAGS:
        choices = {"backbone": BACKBONES, "preset": PRESETS, "normalization": NORMALIZATIONS,
                   "selection": SELECTIONS}.get(name)
        parser.add_argument(flag, dest=name, type=kind, choices=choices, help=text)
    parser.add_argument("--cls-token", dest="cls_token", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend a CLS token (default: when the cell embedding is the CLS output)")
    parser.add_argument("--adjacency-shared", dest="adjacency_shared", action=argparse.BooleanOptionalAction,
                        default=None, help="one adjacency shared by all GNN layers (default: one per layer)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --output (starts fresh if there is none)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    top = {f.name for f in dataclasses.fields(PretrainConfig)} - {"run"}
    for key, value in data.items():
        if key in SECTIONS:
            known = {f.name for f in dataclasses.fields(SECTIONS[key])}
            unknown = set(value or {}) - known
            if unknown:
                raise ValueError(f"config file {path}: unknown {key} field(s) {', '.join(sorted(unknown))}")
        elif key not in top:
            raise ValueError(f"config file {path}: unknown key {key!r}")
    return data


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Resolve and validate the whole run configuration before any work starts."""
    data = _read_yaml(args.config) if args.config else {}
    sections = {name: dict(data.get(name) or {}) for name in SECTIONS}
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    overrides = [(section, name) for _, section, name, _, _ in FLAGS]
    overrides += [("tokenizer", "cls_token"), ("model", "adjacency_shared"), (None, "deepspeed_config")]
    for section, name in overrides:
        value = getattr(args, name)
        if value is not None:
            (sections[section] if section else top)[name] = value
    if args.resume:
        top["resume"] = True
    run = RunConfig(**{name: cls(**sections[name]) for name, cls in SECTIONS.items()})
    return PretrainConfig(run=run, **top)
