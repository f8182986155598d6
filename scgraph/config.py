"""The run's typed configuration (model, tokenizer, training, recipes), validated at start-up,
and the checks every command's config shares.

A config is a dataclass validated in ``__post_init__``, so a bad run fails before any work with one
line naming the field, and ``dataclasses.asdict`` gives the whole resolved config for MLflow. Each
field is declared with :func:`scgraph.cli.option` (its help text): the command lines and YAML
config files are generated from these classes. Each command's own config sits beside the command
(``scgraph.train.config``, ``scgraph.eval.config``, ``scgraph.synthetic.config``,
``scgraph.data.shards.config``, ``scgraph.demo``) and embeds or reads the run's from here.

Defaults are the paper's (its pretraining settings, its linear probe and its synthetic study).
Model presets fill only the fields left as ``None``: an explicit value wins. The model's names
validated here (mixers and their families, adjacencies, activations, presets) are
``scgraph.models.config``'s, which needs no torch: so checking a config needs none either, and
the model imports this module without a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")


def check_schedule(cfg: Any) -> None:
    """The learning-rate schedule's fields, shared by pretraining and the synthetic study."""
    check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
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
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("preset", self.preset, tuple(PRESETS))
        shared, per_family = PRESETS[self.preset]
        for name, value in (shared | per_family.get(self.family, {})).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_positive("vocab_size", self.vocab_size)
        check_positive("hidden", self.hidden)
        check_positive("layers", self.layers)
        check_positive("heads", self.heads)
        check_positive("graph_heads", self.graph_heads)
        check_positive("adjacency_scale", self.adjacency_scale)
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
            check_positive("value_clamp", self.value_clamp)
        check_positive("n_bins", self.n_bins)
        check_choice("block_layout", self.block_layout, BLOCK_LAYOUTS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("value_encoder", self.value_encoder, VALUE_ENCODERS)
        check_choice("cell_embedding", self.cell_embedding, CELL_EMBEDDINGS)
        check_choice("adjacency", self.adjacency, ADJACENCIES)
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
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
    gene_dropout: float = option(0.5, "in training, hide each expressed gene of a cell that has more than L with this "
                                 "probability before the L are chosen, so a cell does not show the same L genes every "
                                 "epoch (400 training cells were memorised without it); inference hides none; 0: off",
                                 metavar="P")
    hvg_genes: int | None = option(None, "only the N most variable genes of the corpus (from the shard set's gene "
                                   "statistics) may be a cell's tokens, in training and at inference (default: every "
                                   "gene)", metavar="N")

    def __post_init__(self) -> None:
        check_positive("seq_len", self.seq_len)
        if self.hvg_genes is not None:
            check_positive("hvg_genes", self.hvg_genes)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_positive("target_sum", self.target_sum)
        if self.n_bins is not None and self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (or None for no binning); got {self.n_bins}")
        check_choice("selection", self.selection, SELECTIONS)
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
        check_choice("recipe", self.recipe, tuple(RECIPES))
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.max_steps))
        parse_objectives(self.objectives)
        check_positive("recon_genes", self.recon_genes)
        check_positive("lr", self.lr)
        check_positive("batch_size", self.batch_size)
        check_positive("max_steps", self.max_steps)
        check_positive("log_every", self.log_every)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1); got {self.mask_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        check_schedule(self)

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
        train, tokenizer = dict(data["train"]), dict(data["tokenizer"])
        train.setdefault("objectives", "mvp")  # recorded before objectives were configurable: MVP alone
        tokenizer.setdefault("gene_dropout", 0.0)  # recorded before gene dropout: none
        return cls(model=ModelConfig(**data["model"]), tokenizer=TokenizerConfig(**tokenizer),
                   train=TrainConfig(**train))
