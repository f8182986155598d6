"""Typed, validated configuration. Defaults are the paper's Table II settings (SPEC §1).

Every config is a frozen-by-convention dataclass validated in ``__post_init__`` so a bad run fails
at start-up with one line naming the field, and ``asdict`` gives the whole resolved config for
MLflow. Presets fill only the fields left as ``None``: an explicit value always wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("transformer", "gnn")
PRESETS = ("scbenchmark", "symmetric")

#: Size of the CELLxGENE Census gene vocabulary used by the paper (homo sapiens).
CENSUS_VOCAB_SIZE = 60_664

# What each preset sets when the user leaves a field as None. ``scbenchmark`` is the authors'
# released architecture (Transformer: nn.TransformerEncoderLayer, post-norm, ReLU, FFN width d;
# GNN: gnn_cp, no FFN, Linear -> LayerNorm -> GELU -> residual). ``symmetric`` is the controlled
# experiment: the same pre-norm block for both, only the mixer differs.
_PRESET_FIELDS: dict[tuple[str, str], dict[str, Any]] = {
    ("symmetric", "transformer"): dict(
        mlp_ratio=4.0, block_layout="pre_norm", activation="gelu", value_encoder="linear",
        cell_embedding="mean", adjacency="factorized", graph_out_proj=True),
    ("symmetric", "gnn"): dict(
        mlp_ratio=4.0, block_layout="pre_norm", activation="gelu", value_encoder="linear",
        cell_embedding="mean", adjacency="factorized", graph_out_proj=True),
    ("scbenchmark", "transformer"): dict(
        mlp_ratio=1.0, block_layout="post_norm", activation="relu", value_encoder="mlp",
        cell_embedding="cls", adjacency="factorized", graph_out_proj=False),
    ("scbenchmark", "gnn"): dict(
        mlp_ratio=0.0, block_layout="post_act", activation="gelu", value_encoder="mlp",
        cell_embedding="cls", adjacency="symmetric_mlp", graph_out_proj=False),
}

BLOCK_LAYOUTS = ("pre_norm", "post_norm", "post_act")
ACTIVATIONS = ("gelu", "relu")
VALUE_ENCODERS = ("linear", "mlp", "bins")
CELL_EMBEDDINGS = ("mean", "cls")
ADJACENCIES = ("factorized", "symmetric_mlp")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")


@dataclass
class ModelConfig:
    """One backbone. ``vocab_size`` counts genes only; pad and CLS tokens are appended after them."""

    backbone: str = "transformer"
    preset: str = "scbenchmark"
    vocab_size: int = CENSUS_VOCAB_SIZE
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    dropout: float = 0.0
    adjacency_rank: int = 64
    adjacency_shared: bool = False
    graph_heads: int = 1
    adjacency_scale: float = 1.0
    value_clamp: float | None = 512.0
    n_bins: int = 51
    # Filled by the preset when None.
    mlp_ratio: float | None = None
    block_layout: str | None = None
    activation: str | None = None
    value_encoder: str | None = None
    cell_embedding: str | None = None
    adjacency: str | None = None
    graph_out_proj: bool | None = None

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("preset", self.preset, PRESETS)
        for name, value in _PRESET_FIELDS[(self.preset, self.backbone)].items():
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
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.hidden % self.graph_heads:
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

    @property
    def pad_id(self) -> int:
        return self.vocab_size

    @property
    def cls_id(self) -> int:
        return self.vocab_size + 1

    @property
    def n_tokens(self) -> int:
        """Rows of every gene-indexed table: the genes, then pad and CLS."""
        return self.vocab_size + 2

    @property
    def ffn_width(self) -> int:
        return int(round(self.mlp_ratio * self.hidden))


NORMALIZATIONS = ("log1p", "none")
SELECTIONS = ("random", "top")


@dataclass
class TokenizerConfig:
    """How a cell's raw counts become model input (applied at load time, never stored in shards).

    ``seq_len`` counts genes; a CLS token, when on, is prepended on top of them. ``cls_token``
    left as None follows the model: on when the cell embedding is the CLS output.
    """

    seq_len: int = 512
    normalization: str = "log1p"
    target_sum: float = 1e4
    n_bins: int | None = None
    selection: str = "random"
    cls_token: bool | None = None

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _positive("target_sum", self.target_sum)
        if self.n_bins is not None and self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (or None for no binning); got {self.n_bins}")
        _choice("selection", self.selection, SELECTIONS)

    @property
    def length(self) -> int:
        """Tokens per cell after tokenization (genes plus the optional CLS)."""
        return self.seq_len + int(bool(self.cls_token))


@dataclass
class TrainConfig:
    """Optimisation settings shared by the plain loop and the DeepSpeed engine."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 256
    max_steps: int = 1000
    mask_ratio: float = 0.15
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
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


@dataclass
class RunConfig:
    """Everything a run needs, logged whole to MLflow."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
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
