"""The pretraining command's configuration (``launchers/pretrain.py``): the run (model, tokenizer,
training) plus where its data, output, DeepSpeed config and MLflow store are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scgraph.cli import option
from scgraph.config import RunConfig, check_positive
from scgraph.models.config import KERNELS


@dataclass
class PretrainConfig:
    """Pretraining of a Transformer or GNN backbone on WebDataset shards with DeepSpeed ZeRO: by default the cell
    recipe (the cell's expression profile reconstructed from its embedding), or the paper's masked value prediction
    (--recipe paper). Run with `deepspeed`, `torchrun` or plain `python` (one process)."""

    run: RunConfig = option(help="model, tokenizer, training", flatten=True, default_factory=RunConfig)
    shards: str = option("", "shard directory written by `python -m sharding write`", required=True)
    output: str = option("runs/pretrain", "run directory: checkpoints, figures")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON (ds_configs/); default: plain data parallel in "
                                          "fp32", flag="--deepspeed_config", aliases=("--deepspeed-config",))
    micro_batch_size: int | None = option(None, "cells per rank per forward; overrides the DeepSpeed config's "
                                          "train_micro_batch_size_per_gpu")
    epochs: int | None = option(None, "train this many epochs over the shards instead of --max-steps")
    checkpoint_every: int = option(500, "save a checkpoint every N steps")
    resume: bool = option(False, "continue from the latest checkpoint in --output (starts fresh if there is none)")
    resume_from: str | None = option(None, "continue from this checkpoint tag in --output/checkpoints instead of the "
                                     "latest (e.g. step00000500); implies --resume", metavar="TAG")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                    "sqlite:///mlflow.db)")
    experiment: str = option("scgraph", "MLflow experiment name")
    run_name: str | None = option(None, "MLflow run name (default: MLflow's)")
    system_metrics: bool = option(True, "log CPU, memory and GPU use to the MLflow run every 10 s (rank 0)")
    val_shards: str | None = option(None, "held-out shard set (same vocabulary) for the validation loss", metavar="DIR")
    val_fraction: float = option(0.0, "hold out this share of --shards' shards (whole shards, chosen by the seed) "
                                 "for the validation loss instead of --val-shards")
    val_every: int = option(0, "validation loss every N steps and at the end (0: only at the end when there is "
                                "validation data)")
    val_cells: int | None = option(None, "validate on at most this many held-out cells (the same ones each time)")
    num_workers: int = option(0, "DataLoader worker processes per rank")
    verify_shards: bool = option(True, "check each shard's sha256 against the manifest the first time the run reads "
                                 "it (--no-verify-shards: for shards verified already)")
    shuffle_buffer: int = option(4096, "cells in each stream's shuffle buffer: at most twice that many held in memory "
                                 "(8 bytes per expressed gene), besides the one shard each stream maps")
    group_by_length: int = option(16, "sort each window of this many micro-batches' cells by how many genes they show "
                                  "(up to L) and cut it into micro-batches, served in a seeded order, so a step pads "
                                  "little when cells are shorter than L (1: no grouping)")
    flops_cells: int = option(2, "cells of the first training micro-batch the FLOPs per cell are counted on (the "
                              "gene decoder's share grows with the distinct genes they show: the whole micro-batch "
                              "counts it exactly)")
    graph_kernel: str = option("auto", "how the GNN computes softmax(U[g]V[g]^T) H W_v: auto (one fused SDPA call "
                               "where a kernel takes the widths, else scores_once), scores_once (blocked, exact, "
                               "nothing L x L kept), sdpa, or subheads (values as sub-heads of the adjacency's width, "
                               "scores recomputed per sub-head)", choices=KERNELS)
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward instead of keeping "
                                            "them (less memory, about a third more compute)")
    compile: bool = option(False, "torch.compile the model (minutes of compilation first)")
    peak_tflops: float | None = option(None, "the device's peak TFLOP/s for MFU (default: from a table of common "
                                       "GPUs in bf16/fp16; none on CPU)")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required: a shard directory written by `python -m sharding write`")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {self.epochs}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0; got {self.checkpoint_every}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0; got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {self.num_workers}")
        check_positive("flops_cells", self.flops_cells)
        check_positive("group_by_length", self.group_by_length)
        if self.resume_from is not None:
            if self.resume_from != Path(self.resume_from).name or self.resume_from in (".", ".."):
                raise ValueError(f"--resume-from takes a checkpoint tag of this run (a folder name in "
                                 f"{Path(self.output) / 'checkpoints'}, e.g. step00000004), not a path; got "
                                 f"{self.resume_from!r}")
            self.resume = True
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if self.val_fraction and self.val_shards:
            raise ValueError("give --val-shards or --val-fraction, not both")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0; got {self.val_every}")
        if self.val_every and not (self.val_shards or self.val_fraction):
            raise ValueError(f"--val-every {self.val_every} needs validation data: give --val-shards DIR or "
                             "--val-fraction")
        if self.val_cells is not None:
            check_positive("val_cells", self.val_cells)
        if self.peak_tflops is not None:
            check_positive("peak_tflops", self.peak_tflops)
        model = self.run.model
        value_width = model.hidden // model.graph_heads
        if self.graph_kernel == "subheads" and model.family == "graph" and value_width % model.score_width:
            raise ValueError(f"--graph-kernel subheads needs hidden / graph_heads ({value_width}) to be a multiple of "
                             f"the adjacency's width ({model.score_width}); use scores_once")
