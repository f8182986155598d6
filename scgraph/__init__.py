"""scgraph: pretrain and compare a Transformer and a static-adjacency GNN on single-cell data."""

__version__ = "0.1.0"
