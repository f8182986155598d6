"""The backbones: one Block, a token mixer per backbone (see model.py)."""

from scgraph.models.model import (
    ACTIVATIONS,
    ADJACENCIES,
    MIXERS,
    AttentionMixer,
    Block,
    CellModel,
    GraphMixer,
    build_model,
    count_parameters,
    mvp_loss,
)

__all__ = ["ACTIVATIONS", "ADJACENCIES", "MIXERS", "AttentionMixer", "Block", "CellModel", "GraphMixer",
           "build_model", "count_parameters", "mvp_loss"]
