"""Every typed configuration, validated at start-up; the source of every command line.

A config is a dataclass validated in ``__post_init__``, so a bad run fails before any work with one
line naming the field, and ``dataclasses.asdict`` gives the whole resolved config for MLflow. Each
field is declared with :func:`scgraph.cli.option` (its help text): the command lines, YAML config
files and the argv one command writes for another are all generated from these classes.

Defaults are the paper's (its pretraining settings, its linear probe and its synthetic study).
Model presets fill only the fields left as ``None``: an explicit value wins.

This module holds every run's configuration on purpose (one owner), which is why it is longer than
the others. The model's names it validates against (mixers and their families, adjacencies,
activations, kernels, presets) are ``scgraph.models.config``'s, which needs no torch: so importing
this module and checking a model or training config need none either, and the model imports this
module without a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scgraph.cli import option
from scgraph.data import tokens
from scgraph.models.config import (
    ACTIVATIONS,
    ADJACENCIES,
    BACKBONES,
    BLOCK_LAYOUTS,
    CELL_EMBEDDINGS,
    FEATURE_MAPS,
    KERNELS,
    MIXER_FAMILIES,
    PRESETS,
    VALUE_ENCODERS,
)

#: Size of the CELLxGENE Census gene vocabulary used by the paper (homo sapiens).
CENSUS_VOCAB_SIZE = 60_664

NORMALIZATIONS = ("log1p", "none")
LR_SCHEDULES = ("constant", "cosine", "linear")
#: How training picks L of a cell's genes: uniformly, the top L by expression, at random with
#: probability proportional to the (normalised) value, or the top L by the value divided by the
#: gene's median over the corpus (Geneformer's normalised rank).
SELECTIONS = ("random", "top", "weighted", "rank")
#: How genes are chosen when a frozen encoder embeds cells: as in training (``train``: the same
#: selection, seeded where it is random), top-L by expression, by normalised rank, a seeded random
#: L, or all of each cell's genes. The training tokenizer's ``hvg_genes`` restriction always holds.
EMBED_SELECTIONS = ("train", "top", "rank", "random", "all")
MATCH_KEYS = ("feature_id", "feature_name")
#: Pretraining objectives: ``mvp`` (the paper's masked value prediction) predicts each masked gene's
#: value from its own token's final state; ``gepc`` predicts it from the cell embedding and the gene
#: alone (scGPT's GEPC);
#: ``recon`` reconstructs the cell's whole expression profile, zeros included, from the cell embedding.
OBJECTIVES = ("mvp", "gepc", "recon")

# What each training recipe sets when a field is left as None. ``cell`` is the measured default:
# a cell-level objective (reconstruction from the CLS/mean embedding) with AdamW, warmup and cosine
# decay; ``paper`` is the authors' recipe (MVP alone, one constant learning rate, no decay).
# ``warmup_steps`` None in a recipe means 5 % of the run's steps.
RECIPES: dict[str, dict[str, Any]] = {
    "cell": dict(objectives="recon", lr=3e-3, lr_schedule="cosine", warmup_steps=None, weight_decay=0.01),
    "paper": dict(objectives="mvp", lr=2e-4, lr_schedule="constant", warmup_steps=0, weight_decay=0.0),
}


def parse_objectives(spec: str) -> dict[str, float]:
    """``"mvp"``, ``"recon"`` or ``"mvp:1,recon:0.5"`` -> {objective: weight}; a name alone weighs 1."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise ValueError(f"objectives: unknown objective {name!r} (choose from {', '.join(OBJECTIVES)})")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"objectives: weight of {name} must be a number; got {weight!r}") from None
        if not value >= 0:
            raise ValueError(f"objectives: weight of {name} must be >= 0; got {weight}")
        if value == float("inf"):
            raise ValueError(f"objectives: weight of {name} must be finite; got {weight}")
        if name in weights:
            raise ValueError(f"objectives: {name} is given twice in {spec!r}")
        weights[name] = value
    if not any(weights.values()):
        raise ValueError(f"objectives: at least one objective needs a weight > 0; got {spec!r}")
    return weights


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")


def _check_schedule(cfg: TrainConfig | StudyConfig) -> None:
    """The learning-rate schedule's fields, shared by pretraining and the synthetic study."""
    _choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"min_lr must be in [0, lr = {cfg.lr:g}]; got {cfg.min_lr:g}")


@dataclass
class ModelConfig:
    """The backbone: its mixer, shape and the preset's layouts."""

    backbone: str = option("transformer", "token mixer", choices=BACKBONES)
    preset: str = option("scbenchmark", "architecture preset: scbenchmark = the authors' released layouts, "
                         "symmetric = one pre-norm block for both backbones", choices=tuple(PRESETS))
    vocab_size: int = option(CENSUS_VOCAB_SIZE, "genes in the vocabulary (pad and CLS are appended after them); "
                             "pretraining takes the shard set's", cli=False)
    hidden: int = option(256, "hidden size d")
    layers: int = option(6, "number of blocks")
    heads: int = option(8, "attention heads of the Transformer")
    dropout: float = option(0.0, "dropout")
    adjacency_rank: int = option(64, "rank r of the GNN adjacency factors")
    adjacency_shared: bool = option(False, "one adjacency shared by all GNN layers (default: one per layer)")
    graph_heads: int = option(1, "independent adjacencies per GNN layer")
    adjacency_scale: float = option(1.0, "factor on the GNN's scores U[g]V[g]^T before the softmax")
    value_clamp: float | None = option(512.0, "values above this are clamped before the value encoder")
    n_bins: int = option(51, "rows of the value-bin embedding (value_encoder bins)", cli=False)
    # Filled by the preset when None.
    mlp_ratio: float | None = option(None, "feed-forward width / hidden (0: no feed-forward; default: the preset's)")
    block_layout: str | None = option(None, "block layout (default: the preset's)", choices=BLOCK_LAYOUTS)
    activation: str | None = option(None, "activation (default: the preset's)", choices=ACTIVATIONS)
    value_encoder: str | None = option(None, "value encoder (default: the preset's)", choices=VALUE_ENCODERS)
    cell_embedding: str | None = option(None, "cell embedding: the CLS output or the mean over genes (default: the "
                                        "preset's)", choices=CELL_EMBEDDINGS)
    adjacency: str | None = option(None, "GNN adjacency (default: the preset's)",
                                   choices=ADJACENCIES)
    graph_out_proj: bool | None = option(None, "output projection after the GNN mixer (default: the preset's)")
    feature_map: str = option("elu+1", "positive feature map of the linear GNN (gnn_linear)",
                              choices=FEATURE_MAPS)
    cell_decoder: bool | None = option(None, "a gene decoder that reads the cell embedding (default: when an "
                                       "objective needs it)", cli=False)

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("preset", self.preset, tuple(PRESETS))
        shared, per_family = PRESETS[self.preset]
        for name, value in (shared | per_family.get(self.family, {})).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _positive("vocab_size", self.vocab_size)
        _positive("hidden", self.hidden)
        _positive("layers", self.layers)
        _positive("heads", self.heads)
        _positive("graph_heads", self.graph_heads)
        _positive("adjacency_scale", self.adjacency_scale)
        if self.adjacency_rank <= 0:
            raise ValueError(f"adjacency_rank must be > 0; got {self.adjacency_rank}")
        if self.family == "attention" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.family == "graph" and self.hidden % self.graph_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by graph_heads ({self.graph_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0; got {self.mlp_ratio}")
        if self.value_clamp is not None:
            _positive("value_clamp", self.value_clamp)
        _positive("n_bins", self.n_bins)
        _choice("block_layout", self.block_layout, BLOCK_LAYOUTS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("value_encoder", self.value_encoder, VALUE_ENCODERS)
        _choice("cell_embedding", self.cell_embedding, CELL_EMBEDDINGS)
        _choice("adjacency", self.adjacency, ADJACENCIES)
        _choice("feature_map", self.feature_map, FEATURE_MAPS)
        if self.family == "graph" and self.dropout > 0 and (self.hidden // self.graph_heads) % self.score_width:
            raise ValueError(f"dropout in the GNN's attention runs on its sub-head kernel, which needs hidden / "
                             f"graph_heads ({self.hidden // self.graph_heads}) to be a multiple of the adjacency's "
                             f"width ({self.score_width}); set dropout 0 or change hidden, graph_heads or "
                             "adjacency_rank")

    @property
    def family(self) -> str:
        """'attention' (weights computed from the cell) or 'graph' (a static gene-gene adjacency)."""
        return MIXER_FAMILIES[self.backbone]

    @property
    def pad_id(self) -> int:
        return tokens.pad_id(self.vocab_size)

    @property
    def cls_id(self) -> int:
        return tokens.cls_id(self.vocab_size)

    @property
    def n_tokens(self) -> int:
        """Rows of every gene-indexed table: the genes, then pad and CLS."""
        return tokens.n_tokens(self.vocab_size)

    @property
    def ffn_width(self) -> int:
        return int(round(self.mlp_ratio * self.hidden))

    @property
    def score_width(self) -> int:
        """Width of the GNN's queries and keys: r, or 2r for the symmetric-MLP adjacency
        ([F[g], M(F'[g])] concatenated)."""
        return self.adjacency_rank * (2 if self.adjacency == "symmetric_mlp" else 1)


@dataclass
class TokenizerConfig:
    """How a cell's raw counts become model input (applied at load time, never stored in shards).

    ``seq_len`` counts genes; a CLS token, when on, is prepended on top of them. ``cls_token``
    left as None follows the model: on when the cell embedding is the CLS output.
    """

    seq_len: int = option(512, "genes per cell L")
    normalization: str = option("log1p", "value normalisation: log1p of counts per target-sum, or none",
                                choices=NORMALIZATIONS)
    target_sum: float = option(1e4, "library size each cell is scaled to before log1p")
    n_bins: int | None = option(None, "bin values scGPT-style into this many bins (default: no binning)")
    selection: str = option("top", "which genes when a cell has more than L: the top L by expression (the default: "
                            "inference shows the same genes, and at census density a random L there loses 20+ "
                            "points), L at random (a new draw each epoch), L drawn with probability proportional to "
                            "the value, or the top L by normalised rank (the value over the gene's corpus median)",
                            choices=SELECTIONS)
    cls_token: bool | None = option(None, "prepend a CLS token (default: when the cell embedding is the CLS output)")
    gene_dropout: float = option(0.0, "in training, hide each expressed gene of a cell that has more than L with this "
                                 "probability before the L are chosen, so a small corpus does not show the same L "
                                 "genes of a cell every epoch; inference hides none", metavar="P")
    hvg_genes: int | None = option(None, "only the N most variable genes of the corpus (from the shard set's gene "
                                   "statistics) may be a cell's tokens, in training and at inference (default: every "
                                   "gene)", metavar="N")

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len)
        if self.hvg_genes is not None:
            _positive("hvg_genes", self.hvg_genes)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _positive("target_sum", self.target_sum)
        if self.n_bins is not None and self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (or None for no binning); got {self.n_bins}")
        _choice("selection", self.selection, SELECTIONS)
        if not 0.0 <= self.gene_dropout < 1.0:
            raise ValueError(f"gene_dropout must be in [0, 1); got {self.gene_dropout}")

    @property
    def length(self) -> int:
        """Tokens per cell after tokenization (genes plus the optional CLS)."""
        return self.seq_len + int(bool(self.cls_token))


@dataclass
class TrainConfig:
    """Optimisation: objectives, learning rate, batch, steps, masking, seed. The recipe fills every
    field left as None (``RECIPES``); an explicit value wins."""

    recipe: str = option("cell", "training recipe: cell = a cell-level objective with AdamW, warmup and cosine decay "
                         "(measured best for cell embeddings), paper = the authors' MVP alone at one constant rate",
                         choices=tuple(RECIPES))
    objectives: str | None = option(None, "what pretraining predicts, with weights: mvp (masked values from their "
                                    "tokens), gepc (masked values from the cell embedding), recon (the whole "
                                    "profile from the cell embedding), e.g. 'recon' or 'mvp:1,recon:0.5' (default: "
                                    "the recipe's)")
    recon_genes: int = option(1024, "genes the recon objective scores per cell besides the expressed ones: that many "
                              "unexpressed genes sampled and reweighted (the whole vocabulary when it is smaller)")
    lr: float | None = option(None, "peak AdamW learning rate (default: the recipe's)")
    lr_schedule: str | None = option(None, "learning rate after the warmup: constant, or decayed to --min-lr by the "
                                     "last step (cosine, linear) (default: the recipe's)", choices=LR_SCHEDULES)
    warmup_steps: int | None = option(None, "steps of linear warmup from lr/warmup to lr (default: the recipe's)")
    min_lr: float = option(0.0, "learning rate at the last step of a cosine or linear decay")
    weight_decay: float | None = option(None, "AdamW weight decay, applied to weight matrices only (not to norms, "
                                        "biases, gene or value embeddings, or adjacency factors) (default: the "
                                        "recipe's)")
    batch_size: int = option(256, "global batch in cells = micro-batch x ranks x accumulation")
    max_steps: int = option(1000, "optimizer steps (--epochs overrides)")
    mask_ratio: float = option(0.15, "fraction of each cell's values masked (predicted by mvp and gepc; hidden from "
                               "the encoder for recon too)")
    grad_clip: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    seed: int = option(0, "seed of model init, data order and masks")
    log_every: int = option(10, "log metrics every N steps")

    def __post_init__(self) -> None:
        _choice("recipe", self.recipe, tuple(RECIPES))
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.max_steps))
        parse_objectives(self.objectives)
        _positive("recon_genes", self.recon_genes)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size)
        _positive("max_steps", self.max_steps)
        _positive("log_every", self.log_every)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1); got {self.mask_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        _check_schedule(self)

    @property
    def weights(self) -> dict[str, float]:
        """Each objective's weight in the loss."""
        return parse_objectives(self.objectives)

    @property
    def decodes_cells(self) -> bool:
        """Whether an objective reads the cell embedding (the model then carries a gene decoder)."""
        return bool(self.weights.get("gepc") or self.weights.get("recon"))


@dataclass
class RunConfig:
    """The model, its tokenizer and its training: what a checkpoint records."""

    model: ModelConfig = option(help="the backbone", default_factory=ModelConfig)
    tokenizer: TokenizerConfig = option(help="tokenization", default_factory=TokenizerConfig)
    train: TrainConfig = option(help="optimisation", default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.cell_decoder is None:
            self.model.cell_decoder = self.train.decodes_cells
        if self.train.decodes_cells and not self.model.cell_decoder:
            raise ValueError(f"objectives {self.train.objectives!r} read the cell embedding through a gene decoder, "
                             "but model.cell_decoder is off")
        if self.tokenizer.cls_token is None:
            self.tokenizer.cls_token = self.model.cell_embedding == "cls"
        if self.model.cell_embedding == "cls" and not self.tokenizer.cls_token:
            raise ValueError(
                "model.cell_embedding is 'cls' but tokenizer.cls_token is off: "
                "turn tokenizer.cls_token on or use cell_embedding='mean'")
        if self.model.value_encoder == "bins" and self.tokenizer.n_bins is None:
            raise ValueError("model.value_encoder is 'bins' but tokenizer.n_bins is not set")
        if self.tokenizer.n_bins is not None and self.tokenizer.n_bins > self.model.n_bins:
            raise ValueError(
                f"tokenizer.n_bins ({self.tokenizer.n_bins}) exceeds model.n_bins "
                f"({self.model.n_bins})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The inverse of ``to_dict`` (a checkpoint's or an MLflow run's record)."""
        train = dict(data["train"])
        train.setdefault("objectives", "mvp")  # recorded before objectives were configurable: MVP alone
        return cls(model=ModelConfig(**data["model"]), tokenizer=TokenizerConfig(**data["tokenizer"]),
                   train=TrainConfig(**train))


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
        _positive("flops_cells", self.flops_cells)
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
            _positive("val_cells", self.val_cells)
        if self.peak_tflops is not None:
            _positive("peak_tflops", self.peak_tflops)
        model = self.run.model
        value_width = model.hidden // model.graph_heads
        if self.graph_kernel == "subheads" and model.family == "graph" and value_width % model.score_width:
            raise ValueError(f"--graph-kernel subheads needs hidden / graph_heads ({value_width}) to be a multiple of "
                             f"the adjacency's width ({model.score_width}); use scores_once")


@dataclass
class ProbeConfig:
    """The paper's linear probe: freeze the pretrained encoder, embed every cell, train one linear layer as
    cell-type classifier on a 70/30 stratified split (50 epochs, batch 64, Adam lr 0.005), repeat with different
    seeds, report accuracy and macro-F1 as mean ± std, with kNN accuracy (k = 10) and the agreement of k-means
    clusters with the labels (ARI, NMI) and the label silhouette, beside four controls scored the same way (a
    random-init encoder of the same shape, a bag of genes — the mean of a random gene table over the genes each
    cell shows —, PCA-50 of log1p CP10k, logistic regression on log1p CP10k), and each embedding's effective rank
    and the share of it that library size and genes per cell explain (collapse shows there). Writes OUT/probe.json,
    a t-SNE and a confusion-matrix PNG, and an MLflow run tagged with the pretraining run's id."""

    checkpoint: str = option(help="a pretraining --output directory (its latest checkpoint), its checkpoints/ "
                             "directory, one checkpoint directory, an exported model/ folder, or runs:/RUN_ID/model "
                             "(from --mlflow-uri)")
    data: str = option(help="labelled cells: an .h5ad file (raw counts in raw.X or X), a shard directory (python -m "
                       "sharding write), or a SOMA URI (a census-layout collection from build-soma, or a bare "
                       "experiment)")
    label_key: str = option("cell_type", "obs column with the cell-type labels")
    repeats: int = option(5, "repeats of split + probe, each with its own seed; results are mean ± std over them")
    out: str = option("runs/probe", "output directory: probe.json and the figures")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: the checkpoint's, else $MLFLOW_TRACKING_URI "
                                    "or sqlite:///mlflow.db)")
    experiment: str | None = option(None, "MLflow experiment (default: the pretraining run's)")
    export: str | None = option(None, "write the input cells with their embeddings in "
                                ".obsm['X_scgraph_<backbone>'] to this .h5ad")
    dataset_name: str | None = option(None, "name of the data set in tables and MLflow (default: the file or "
                                      "directory name)")
    match_genes_by: str = option("feature_id", "how the data's genes are matched to the checkpoint's vocabulary",
                                 choices=MATCH_KEYS)
    organism: str = option("homo_sapiens", "experiment of a census-layout collection")
    test_fraction: float = option(0.3, "share of each class held out for testing (the paper: 0.3)")
    epochs: int = option(50, "probe training epochs (the paper: 50)")
    batch_size: int = option(64, "probe batch size (the paper: 64)")
    lr: float = option(0.005, "probe Adam learning rate (the paper: 0.005)")
    standardize: bool = option(True, "z-score each embedding feature with the training cells' mean and std before "
                               "the linear layer (still one linear map, but one Adam can fit in 50 epochs); "
                               "--no-standardize feeds the raw embeddings")
    seed: int = option(0, "seed of the splits, probe inits and the random-encoder control (repeat i uses seed + i)")
    embed_batch_size: int = option(256, "cells per forward pass when embedding")
    embed_selection: str = option("train", "which genes each cell shows the encoder (and the controls): as the "
                                  "encoder was trained (train: the same selection, seeded where random), its top "
                                  "--embed-seq-len by expression or by normalised rank, a seeded random "
                                  "--embed-seq-len, or all", choices=EMBED_SELECTIONS)
    embed_seq_len: int | None = option(None, "genes per cell when embedding (default: the training L)")
    tsne_cells: int = option(2000, "at most this many cells (a seeded sample) in the t-SNE figure")
    quiet: bool = option(False, "no progress bars")
    overwrite: bool = option(False, "replace what --out and --export hold from another probe (another checkpoint or "
                             "other settings); without it they are refused")

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1; got {self.repeats}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in (0, 1); got {self.test_fraction}")
        _choice("--match-genes-by", self.match_genes_by, MATCH_KEYS)
        if self.tsne_cells < 2:
            raise ValueError(f"--tsne-cells must be >= 2; got {self.tsne_cells}")
        if self.export is not None and not self.export.endswith(".h5ad"):
            raise ValueError(f"--export must name an .h5ad file; got {self.export!r}")
        if self.embed_seq_len is not None:
            _positive("--embed-seq-len", self.embed_seq_len)


@dataclass
class CompareConfig:
    """The paper's Table II from an MLflow experiment: for each setting (hidden/L) and backbone, forward FLOPs per
    cell and peak training memory of the pretraining run, the linear-probe accuracy (mean ± std) on each probed data
    set, their average, and GNN − TF. Writes OUT/table2.csv, table2.md and a bar chart table2.png, also as
    artifacts of a 'table2' run."""

    experiment: str = option(help="MLflow experiment holding pretraining and probe runs")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    out: str = option("runs/compare", "output directory")


@dataclass
class DemoConfig:
    """Build a census-layout SOMA collection from the real CBMC cells, shard it through the census path, pretrain
    the Transformer and the GNN with deepspeed, probe both on held-out cells, and print the Table II comparison.
    A second run reuses every finished step. Small enough for a 2-core machine in minutes."""

    out: str = option("runs/demo", "output directory; a second run with the same settings reuses its finished steps "
                      "(use a new one after changing model settings)")
    experiment: str = option("scgraph-demo", "MLflow experiment")
    preset: str = option("scbenchmark", "architecture preset", choices=tuple(PRESETS))
    hidden: int = option(128, "hidden size of both backbones")
    layers: int = option(2, "blocks of both backbones")
    heads: int = option(4, "attention heads of the Transformer")
    adjacency_rank: int = option(16, "rank of the GNN's adjacency factors")
    seq_len: int = option(128, "genes per cell L")
    batch_size: int = option(32, "global pretraining batch (cells)")
    micro_batch_size: int = option(16, "cells per rank per forward")
    steps: int = option(1800, "pretraining steps of each backbone")
    recipe: str = option("cell", "training recipe (cell: the measured best for cell embeddings; paper: the authors' "
                         "MVP alone)", choices=tuple(RECIPES))
    lr: float | None = option(None, "pretraining AdamW peak learning rate (default: the recipe's)")
    ranks: int = option(2, "deepspeed processes (CPU ranks, or GPUs)")
    held_out_cells: int = option(2000, "CBMC cells kept out of pretraining for the probe")
    repeats: int = option(5, "probe repeats (split + probe seeds)")
    seed: int = option(0, "seed of the held-out choice, pretraining and the probe")

    def __post_init__(self) -> None:
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("recipe", self.recipe, tuple(RECIPES))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and f.name != "seed" and value <= 0:
                raise ValueError(f"{f.name} must be > 0; got {value}")


#: The paper restricts beta to [0, 0.5]; up to 1 is allowed for exploration. Beyond it the
#: predecessor term 2 beta v_{k-1} amplifies every step and values grow geometrically.
BETA_RANGE = (0.0, 1.0)
INITS = ("pytorch", "census")


def _generators() -> tuple[str, ...]:
    from scgraph.synthetic.generators import GENERATORS

    return GENERATORS


def _default_generator() -> str:
    from scgraph.synthetic.generators import DEFAULT_GENERATOR

    return DEFAULT_GENERATOR


@dataclass
class StudyConfig:
    """The synthetic relative-position study (paper Table I, Figure 3): per (beta, sigma) train a one-layer
    Transformer and GNN (hidden 8) on masked value prediction and compare their best test MSE. Writes
    OUT/table1.csv, table1.txt, fig3a_best_loss_vs_beta.png, fig3b_test_loss_curves.png, results.json, and logs to
    MLflow."""

    generator: str | None = option(None, "value generator (default: static_decay, whose error floors are the "
                                   "closest to the paper's Table I; benchmarks/bench_generators.py)",
                                   choices=_generators)
    betas: tuple[float, ...] = option((0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "relative-position coefficients, each in "
                                      f"[{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]", metavar="B,B,...")
    sigmas: tuple[float, ...] = option((0.1, 0.2, 0.3, 0.4, 0.5), "std of the exogenous values, each > 0",
                                       metavar="S,S,...")
    samples: int = option(20_000, "samples per dataset")
    train_fraction: float = option(0.7, "share of samples for training; the rest is the test set")
    epochs: int = option(200, "training epochs per model")
    batch_size: int = option(256, "batch size")
    lr: float = option(1e-3, "peak Adam learning rate")
    lr_schedule: str = option("constant", "learning rate after the warmup: constant, or decayed to --min-lr by the "
                              "last step (cosine, linear)", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "steps of linear warmup from lr/warmup to lr")
    min_lr: float = option(0.0, "learning rate at the last step of a cosine or linear decay")
    repeats: int = option(1, "datasets (and model inits) per setting; losses are averaged over them")
    alpha: float = option(0.1, "absolute-position coefficient")
    mu: tuple[float, ...] = option((1.0, 2.0, 3.0, 4.0), "means of the exogenous values of tokens A, B, C, D",
                                   metavar="M,M,M,M")
    w_seed: int = option(0, "seed of the static coefficients w ~ U(-0.5, 0.5), shared by every setting")
    seed: int = option(0, "seed of the datasets and model inits")
    hidden: int = option(8, "model width")
    mlp_ratio: float = option(0.0, "feed-forward width / hidden in the Block (0: no feed-forward, the paper's "
                              "'single layer' between linear input and output layers)")
    heads: int = option(2, "Transformer attention heads (same parameter count for any number; with one, attention "
                        "can only average the senders' values and stalls far above its floor at beta > 0)")
    graph_heads: int = option(2, "GNN adjacencies, softmax-normalised, of rank 4 each, as many as the Transformer's "
                              "heads (with one, it weights every sender's value with one sign and stalls far above "
                              "its floor; see benchmarks/RESULTS.md)")
    block_layout: str = option("residual", "layout of the shared Block (residual: no normalisation, so the GNN is "
                               "the bare static aggregation of the values; see scgraph/synthetic/models.py)",
                               choices=BLOCK_LAYOUTS)
    position_embedding: bool = option(True, "a learned absolute-position embedding in both models")
    init: str = option("pytorch", "initialisation of the Linear layers: pytorch (PyTorch's default, as the paper's "
                       "nn layers) or census (N(0, 0.02), the large models'; slow to leave the flat attention saddle "
                       "at hidden 8)", choices=INITS)
    standardize: bool = option(True, "feed values standardized by the training set's mean and std (losses are "
                               "reported in the generator's units either way)")
    workers: int = option(2, "parallel processes, one thread each (1: run in this process)")
    out: Path = option(Path("runs/synthetic"), "output directory")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                    "sqlite:///mlflow.db)")
    experiment: str = option("synthetic", "MLflow experiment name")
    overwrite: bool = option(False, "replace the results --out holds from a study with other settings; without it "
                             "they are refused")

    def __post_init__(self) -> None:
        from scgraph.synthetic.generators import N_TOKENS

        if self.generator is None:
            self.generator = _default_generator()
        _choice("generator", self.generator, _generators())
        _choice("block_layout", self.block_layout, BLOCK_LAYOUTS)
        _choice("init", self.init, INITS)
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
        for name in ("samples", "epochs", "batch_size", "repeats", "hidden", "heads", "graph_heads", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        n_test = self.samples - round(self.samples * self.train_fraction)
        if n_test < 1 or n_test == self.samples:
            raise ValueError(f"samples ({self.samples}) is too small to split {self.train_fraction:g} "
                             "train / rest test")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        _check_schedule(self)
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0; got {self.mlp_ratio}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.hidden % (N_TOKENS * self.graph_heads):
            raise ValueError(f"hidden ({self.hidden}) must be divisible by the adjacency rank ({N_TOKENS}) times "
                             f"graph_heads ({self.graph_heads}) so each GNN head's values split into sub-heads")
        self.out = Path(self.out)

    def params(self) -> dict[str, Any]:
        """Flat, MLflow-ready parameters (tuples as comma-separated strings)."""
        return {k: ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)
                for k, v in dataclasses.asdict(self).items()}


# --- sharding (``python -m sharding``) ------------------------------------------------------------

#: Which matrix of an .h5ad holds raw counts: ``auto`` = raw.X when present (the CELLxGENE
#: convention for a normalised X), else X.
H5AD_MATRICES = ("auto", "X", "raw")
PRIMARY_FILTER = "is_primary_data == True"
DEFAULT_OBS_COLUMNS = ("cell_type", "cell_type_ontology_term_id", "tissue", "assay", "disease", "dataset_id",
                       "donor_id")


def parse_slice(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: task I of N (e.g. $SLURM_ARRAY_TASK_ID of an array of N)."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--slice must be I/N with integers 0 <= I < N (e.g. 0/4); got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--slice must be I/N with 0 <= I < N; got {text!r}")
    return i, n


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1; got {value}")


@dataclass(frozen=True)
class WriteOptions:
    """What, besides the source, decides the shards: a re-run must repeat these exactly."""

    obs_filter: str | None = option(None, f"SOMA value_filter on obs, e.g. \"tissue == 'blood'\" (default: "
                                    f"'{PRIMARY_FILTER}' where that column exists, else every cell; '' selects every "
                                    "cell)", metavar="EXPR")
    obs_columns: tuple[str, ...] | None = option(None, "comma-separated obs columns stored with each cell (default: "
                                                 f"those of {','.join(DEFAULT_OBS_COLUMNS)} present in obs)",
                                                 metavar="A,B,..")
    cells_per_shard: int = option(10_000, "cells per shard", metavar="N")
    max_cells: int | None = option(None, "keep a uniform random sample of N of the selected cells (seeded by --seed)",
                                   metavar="N")
    seed: int = option(0, "seed of the --max-cells sample")
    vocab_from: str | None = option(None, "write gene indices in the vocabulary of this existing shard set (e.g. data "
                                    "for a probe of a model pretrained on it); source genes it lacks are dropped",
                                    metavar="DIR")
    match_genes_by: str = option("feature_id", "how --vocab-from matches genes (feature_name for symbols)",
                                 choices=MATCH_KEYS)
    slice: str | None = option(None, "write only part I (0-based) of N of the selected cells' shards: task I of a job "
                               "array of N (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), each into its own "
                               "--out; 'merge' joins the N parts into the shard set one process would write",
                               metavar="I/N")

    def __post_init__(self) -> None:
        _at_least_one("--cells-per-shard", self.cells_per_shard)
        _at_least_one("--max-cells", self.max_cells)
        _choice("--match-genes-by", self.match_genes_by, MATCH_KEYS)
        if self.slice is not None:
            parse_slice(self.slice)


@dataclass(kw_only=True)
class ShardWriteConfig:
    """Select cells with an obs filter and stream their raw counts, block by block, into tar shards (one sample per
    cell: <soma_joinid>.genes.npy, .counts.npy, .obs.json) plus manifest.json. Re-running the same command after an
    interruption resumes after the last complete shard; a different command on a non-empty --out is refused."""

    census_version: str | None = option(None, "the CELLxGENE Census release (e.g. 'stable' or '2025-01-30'), opened "
                                        "with cellxgene_census.open_soma; needs network access", metavar="VERSION",
                                        group="source (exactly one)")
    census_uri: str | None = option(None, "a census-layout collection at a path or URI (e.g. from build-soma), "
                                    "opened through the same cellxgene_census.open_soma code path", metavar="PATH",
                                    group="source (exactly one)")
    soma: str | None = option(None, "a bare SOMA experiment with the census schema (measurement RNA, X layer raw)",
                              metavar="URI", group="source (exactly one)")
    h5ad: str | None = option(None, "an AnnData file, read in backed mode", metavar="FILE",
                              group="source (exactly one)")
    out: str = option(help="output directory (new, empty, or a previous run of this same command to resume)",
                      metavar="DIR")
    organism: str = option("homo_sapiens", "census organism experiment")
    h5ad_matrix: str = option("auto", "which .h5ad matrix holds raw counts: raw (raw.X), X, or auto = raw.X when "
                              "present else X", choices=H5AD_MATRICES)
    options: WriteOptions = option(help="what decides the shards", flatten=True, default_factory=WriteOptions)
    workers: int = option(1, "processes writing shards in parallel, each a contiguous part of them. One process "
                          "already overlaps reading, encoding and file writing on threads, and a worker spends about "
                          "2 CPU-seconds starting (imports, opening the source): on 2 cores 2 workers were slower "
                          "than 1; use more only with more cores", metavar="N")
    block_cells: int | None = option(None, "cells read from the source per block, cut on a grid of N soma_joinids: "
                                     "memory is a few blocks (default: the X array's tile extent along cells, 2048 in "
                                     "the census, so no two blocks decode the same tiles; 2048 for an .h5ad)",
                                     metavar="N")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self) -> None:
        given = [k for k in ("census_version", "census_uri", "soma", "h5ad") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one source: --census-version, --census-uri, --soma or --h5ad")
        _choice("--h5ad-matrix", self.h5ad_matrix, H5AD_MATRICES)
        _at_least_one("--workers", self.workers)
        _at_least_one("--block-cells", self.block_cells)

    @property
    def source(self) -> tuple[str, str]:
        """(kind, location) of the one source given: kind is census-version, census-uri, soma or h5ad."""
        name = next(k for k in ("census_version", "census_uri", "soma", "h5ad") if getattr(self, k) is not None)
        return name.replace("_", "-"), getattr(self, name)


@dataclass
class MergeConfig:
    """Check that the parts come from one write command and cover every slice once, move their shards into --out,
    write the merged manifest and remove the emptied parts. The result equals the shard set a single write would
    give (same shards, manifest and identity). Re-running an interrupted merge finishes it."""

    out: str = option(help="the merged shard set (new or empty)", metavar="DIR")
    parts: tuple[str, ...] = option(help="the part directories, one per slice", positional=True, metavar="PART")


@dataclass
class VerifyConfig:
    """Check every shard's size, sha256, cell count and that every sample decodes (no cell twice, gene indices
    inside the vocabulary, finite non-negative counts). Exits 1 and names each bad shard if anything is wrong."""

    directory: str = option(help="a shard set written by 'write'", positional=True, metavar="DIR")
    quiet: bool = option(False, "no progress bar")


@dataclass
class StatsConfig:
    """Record the per-gene statistics (expressing cells, mean, median and variance of log1p CP10k) of a shard set
    written before `write` recorded them: one pass over its shards. Token selection by normalised rank or by
    variable genes, and the decoder's starting bias, read them."""

    directory: str = option(help="a complete shard set written by 'write'", positional=True, metavar="DIR")
    quiet: bool = option(False, "no progress bar")


@dataclass
class BuildSomaConfig:
    """Write a collection with census_info and census_data/<organism> (measurement RNA, X layer raw, census obs/var
    columns) that cellxgene_census.open_soma(uri=PATH) opens like the real census: the offline stand-in for the
    demo and the tests."""

    h5ad: str = option(help="input AnnData with raw integer counts", metavar="FILE")
    out: str = option(help="new collection directory (must not exist or be empty)", metavar="PATH")
    label_key: str | None = option(None, "obs column copied to cell_type (e.g. bulk_labels)", metavar="COL")
    organism: str = option("homo_sapiens", "experiment name")
    h5ad_matrix: str = option("auto", "which matrix holds raw counts (raw.X when present under auto)",
                              choices=H5AD_MATRICES)
