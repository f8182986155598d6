"""The two backbones: one Block, two token mixers (see model.py)."""

from scgraph.models.model import (
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

__all__ = ["ADJACENCIES", "MIXERS", "AttentionMixer", "Block", "CellModel", "GraphMixer",
           "build_model", "count_parameters", "mvp_loss"]
